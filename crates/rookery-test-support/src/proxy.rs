//! [`TcpProxy`]: a loopback TCP forwarder a test can cut, to take a service
//! (PostgreSQL, NATS) away from the servers under test and give it back. It
//! is the fault checker's proxy (`rookery_bench::harness::Proxy`).

pub use rookery_bench::harness::Proxy as TcpProxy;
