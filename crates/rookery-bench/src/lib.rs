//! rookery-bench as a library: the load client, the server-process probes,
//! the reliable-chat scenario the cluster's no-loss tests drive, and the
//! fault checker with the processes it runs.

#![forbid(unsafe_code)]

pub mod check;
pub mod client;
pub mod harness;
pub mod process;
pub mod reliable;
pub mod scram;
