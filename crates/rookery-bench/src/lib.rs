//! rookery-bench as a library: the load client, the server-process probes, and
//! the reliable-chat scenario the cluster's no-loss tests drive.

#![forbid(unsafe_code)]

pub mod client;
pub mod process;
pub mod reliable;
pub mod scram;
