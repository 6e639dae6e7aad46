//! XEP-0198 stream management counters and the queue of unacknowledged stanzas.
//!
//! The state outlives a connection: when a client resumes, the session hands
//! its `SmState` to the new stream, which retransmits what was not acknowledged.

use std::collections::VecDeque;

use minidom::Element;

use crate::xml::approximate_size;

/// Stream management state of one session.
#[derive(Debug, Clone, Default)]
pub struct SmState {
    /// Resumption id, when the client asked for a resumable session.
    pub id: Option<String>,
    /// Stanzas received from the client and handled (the `h` we report).
    pub inbound: u32,
    /// The last `h` the client acknowledged.
    pub acked: u32,
    /// Stanzas sent to the client and not yet acknowledged, oldest first.
    unacked: VecDeque<Element>,
    /// Their size, by [`approximate_size`].
    unacked_bytes: usize,
}

/// The client acknowledged more stanzas than were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandledCountTooHigh {
    /// The `h` the client sent.
    pub h: u32,
    /// How many stanzas were actually sent.
    pub sent: u32,
}

impl SmState {
    /// Fresh state for a newly enabled session.
    pub fn new(id: Option<String>) -> Self {
        SmState {
            id,
            ..SmState::default()
        }
    }

    /// Counts a stanza handled from the client.
    pub fn handled_inbound(&mut self) {
        self.inbound = self.inbound.wrapping_add(1);
    }

    /// Records a stanza sent to the client.
    pub fn sent(&mut self, stanza: Element) {
        self.unacked_bytes += approximate_size(&stanza);
        self.unacked.push_back(stanza);
    }

    /// The stanzas sent and not yet acknowledged, oldest first.
    pub fn unacked(&self) -> &VecDeque<Element> {
        &self.unacked
    }

    /// The bytes of the unacknowledged stanzas (about).
    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// Total number of stanzas sent (modulo 2^32).
    pub fn sent_count(&self) -> u32 {
        self.acked.wrapping_add(self.unacked.len() as u32)
    }

    /// Applies an `<a h='…'/>` from the client.
    pub fn handle_ack(&mut self, h: u32) -> Result<(), HandledCountTooHigh> {
        let newly_acked = h.wrapping_sub(self.acked) as usize;
        if newly_acked > self.unacked.len() {
            return Err(HandledCountTooHigh {
                h,
                sent: self.sent_count(),
            });
        }
        for stanza in self.unacked.drain(..newly_acked) {
            self.unacked_bytes -= approximate_size(&stanza);
        }
        self.acked = h;
        Ok(())
    }

    /// Removes and returns every unacknowledged stanza.
    pub fn take_unacked(&mut self) -> Vec<Element> {
        self.unacked_bytes = 0;
        self.unacked.drain(..).collect()
    }
}
