//! The per-session state of the server's modules (what a client asked of a
//! module: fetched its block list, and so on), typed for the module that owns
//! it and moving with the session: to a resuming connection on this node as
//! it is, to another node as JSON, read back into its type there when the
//! module first looks at it.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A module's state in one session.
pub trait ModuleState:
    Serialize + DeserializeOwned + Default + fmt::Debug + Send + Sync + 'static
{
    /// Names the state on the wire: unique among modules, stable across versions.
    const KEY: &'static str;
}

/// A typed value, with what it takes to send it elsewhere.
trait Erased: Any + fmt::Debug + Send + Sync {
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn to_json(&self) -> Option<String>;
}

impl<T: ModuleState> Erased for T {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn to_json(&self) -> Option<String> {
        serde_json::to_string(self).ok()
    }
}

#[derive(Debug)]
enum Slot {
    Typed(Box<dyn Erased>),
    /// Arrived from another node; typed at the first look.
    Json(String),
}

/// The states of one session, one per module that keeps one. Empty (and
/// free) for a session whose client asked nothing of such a module.
#[derive(Debug, Default)]
pub struct ModuleStates {
    slots: BTreeMap<String, Slot>,
}

impl ModuleStates {
    /// The module's state, if the session has one.
    pub fn get<T: ModuleState>(&mut self) -> Option<&T> {
        self.typed::<T>().map(|state| &*state)
    }

    /// The module's state, made (default) if the session had none.
    pub fn get_mut<T: ModuleState>(&mut self) -> &mut T {
        if self.typed::<T>().is_none() {
            self.slots
                .insert(T::KEY.to_owned(), Slot::Typed(Box::new(T::default())));
        }
        self.typed::<T>().expect("just made")
    }

    /// The module's state to change, if the session has one (nothing made:
    /// for a hook that runs on every session and acts only on some).
    pub fn existing_mut<T: ModuleState>(&mut self) -> Option<&mut T> {
        self.typed::<T>()
    }

    /// Drops the module's state (the session is back to asking nothing of it).
    pub fn remove<T: ModuleState>(&mut self) {
        self.slots.remove(T::KEY);
    }

    fn typed<T: ModuleState>(&mut self) -> Option<&mut T> {
        let slot = self.slots.get_mut(T::KEY)?;
        if let Slot::Json(json) = slot {
            let value: T = match serde_json::from_str(json) {
                Ok(value) => value,
                Err(error) => {
                    // Another version's state that no longer reads: start afresh.
                    tracing::warn!(key = T::KEY, %error, "A session's module state does not read.");
                    T::default()
                }
            };
            *slot = Slot::Typed(Box::new(value));
        }
        match slot {
            Slot::Typed(value) => value.as_any_mut().downcast_mut::<T>(),
            Slot::Json(_) => unreachable!("typed above"),
        }
    }

    /// The states as JSON by key, to move the session to another node.
    pub fn to_wire(&self) -> BTreeMap<String, String> {
        self.slots
            .iter()
            .filter_map(|(key, slot)| {
                let json = match slot {
                    Slot::Typed(value) => value.to_json()?,
                    Slot::Json(json) => json.clone(),
                };
                Some((key.clone(), json))
            })
            .collect()
    }

    /// The states of a session moved from another node.
    pub fn from_wire(wire: BTreeMap<String, String>) -> Self {
        ModuleStates {
            slots: wire
                .into_iter()
                .map(|(key, json)| (key, Slot::Json(json)))
                .collect(),
        }
    }

    /// True when no module keeps state for the session.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Asked {
        list: bool,
        count: u32,
    }

    impl ModuleState for Asked {
        const KEY: &'static str = "test-asked";
    }

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Other(String);

    impl ModuleState for Other {
        const KEY: &'static str = "test-other";
    }

    #[test]
    fn each_module_gets_its_own_typed_state() {
        let mut states = ModuleStates::default();
        assert!(states.is_empty());
        assert_eq!(states.get::<Asked>(), None);
        states.get_mut::<Asked>().list = true;
        states.get_mut::<Asked>().count += 2;
        states.get_mut::<Other>().0.push_str("mine");
        assert_eq!(
            states.get::<Asked>(),
            Some(&Asked {
                list: true,
                count: 2
            })
        );
        assert_eq!(states.get::<Other>(), Some(&Other("mine".into())));
    }

    #[test]
    fn states_move_to_another_node_as_json_and_read_back_typed() {
        let mut states = ModuleStates::default();
        states.get_mut::<Asked>().count = 7;
        let wire = states.to_wire();
        assert_eq!(wire["test-asked"], r#"{"list":false,"count":7}"#);
        let mut moved = ModuleStates::from_wire(wire.clone());
        // Unread states move on unchanged.
        assert_eq!(moved.to_wire(), wire);
        assert_eq!(moved.get::<Asked>().map(|a| a.count), Some(7));
        assert_eq!(moved.get::<Other>(), None);
        // A state that no longer reads starts afresh.
        let mut broken =
            ModuleStates::from_wire([("test-asked".to_owned(), "[1]".to_owned())].into());
        assert_eq!(broken.get::<Asked>(), Some(&Asked::default()));
    }
}
