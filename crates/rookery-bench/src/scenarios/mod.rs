//! One module per scenario.

pub mod chat;
pub mod connections;
pub mod failover;
pub mod login_storm;
pub mod presence;
pub mod register;
