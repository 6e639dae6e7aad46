//! Rate limits: failed logins and registrations per client address, the
//! byte rate of each connection, and connections open at once per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = now;
    }
}

/// Counts events per client address and refuses them past a rate.
#[derive(Debug)]
pub struct AddressLimiter {
    /// Events allowed per second, sustained.
    rate: f64,
    /// Events allowed in a burst.
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AddressLimiter {
    /// Allows `burst` events at once and `per_minute` per minute after that.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Self::with_rate(burst, f64::from(per_minute) / 60.0)
    }

    /// Allows `burst` events at once and `per_hour` per hour after that.
    pub fn per_hour(burst: u32, per_hour: u32) -> Self {
        Self::with_rate(burst, f64::from(per_hour) / 3600.0)
    }

    fn with_rate(burst: u32, per_second: f64) -> Self {
        AddressLimiter {
            rate: per_second,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True if `address` is still allowed an event (without counting one).
    pub fn allows(&self, address: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("limiter lock");
        match buckets.get_mut(&address) {
            Some(bucket) => {
                bucket.refill(self.rate, self.burst, now);
                bucket.tokens >= 1.0
            }
            None => true,
        }
    }

    /// Counts one event of `address`.
    pub fn record(&self, address: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().expect("limiter lock");
        if buckets.len() > 100_000 {
            // Forget addresses whose buckets are full again.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, bucket| {
                bucket.refill(rate, burst, now);
                bucket.tokens < burst
            });
        }
        let bucket = buckets
            .entry(address)
            .or_insert_with(|| Bucket::full(self.burst, now));
        bucket.refill(self.rate, self.burst, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }
}

/// Throttles the input of one connection to a byte rate (a "shaper").
#[derive(Debug)]
pub struct ByteRate {
    rate: f64,
    burst: f64,
    bucket: Bucket,
}

impl ByteRate {
    /// `rate` bytes per second with bursts of `burst` bytes.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        ByteRate {
            rate: rate as f64,
            burst: burst as f64,
            bucket: Bucket::full(burst as f64, now),
        }
    }

    /// Counts `bytes` read; returns how long to wait before reading again.
    pub fn consume(&mut self, bytes: usize, now: Instant) -> Duration {
        self.bucket.refill(self.rate, self.burst, now);
        self.bucket.tokens -= bytes as f64;
        if self.bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.bucket.tokens / self.rate)
        }
    }
}

/// Counts the connections open from each address, on every listener, and
/// how fast each address opens new ones; refuses one past either limit,
/// except from allowed networks (a load balancer or a proxy, behind which
/// every client has the same address).
#[derive(Debug)]
pub struct ConnectionLimiter {
    /// Most connections at once from one address; 0 for no limit.
    max_per_address: usize,
    /// New connections per address over time, if limited.
    rate: Option<AddressLimiter>,
    allowed: Vec<ipnet::IpNet>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; its count is given back when it drops.
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Option<(Arc<ConnectionLimiter>, IpAddr)>,
}

impl ConnectionLimiter {
    /// At most `max_per_address` connections per address at once (0:
    /// unlimited), but any number from `allowed`.
    pub fn new(max_per_address: usize, allowed: Vec<ipnet::IpNet>) -> Self {
        ConnectionLimiter {
            max_per_address,
            rate: None,
            allowed,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Also at most `burst` new connections at once per address, then
    /// `per_minute` (0: no rate limit).
    pub fn with_rate(mut self, burst: u32, per_minute: u32) -> Self {
        self.rate = (per_minute > 0).then(|| AddressLimiter::new(burst.max(1), per_minute));
        self
    }

    /// Admits a connection from `address`, or `None` when it has too many
    /// open or opened too many lately.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<ConnectionPermit> {
        self.admit_at(address, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, address: IpAddr, now: Instant) -> Option<ConnectionPermit> {
        let address = address.to_canonical();
        if self.allowed.iter().any(|net| net.contains(&address)) {
            return Some(ConnectionPermit { limiter: None });
        }
        let address = client_key(address);
        if let Some(rate) = &self.rate {
            if !rate.allows(address, now) {
                return None;
            }
            rate.record(address, now);
        }
        if self.max_per_address == 0 {
            return Some(ConnectionPermit { limiter: None });
        }
        let mut open = self.open.lock().expect("limiter lock");
        let count = open.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(ConnectionPermit {
            limiter: Some((self.clone(), address)),
        })
    }

    /// Connections open from `address` (those counted).
    pub fn open_from(&self, address: IpAddr) -> usize {
        let open = self.open.lock().expect("limiter lock");
        open.get(&client_key(address.to_canonical()))
            .copied()
            .unwrap_or(0)
    }
}

/// What the connection limits count by: an IPv4 address, or an IPv6 /64
/// (one subscriber's network: whoever has one has 2^64 addresses).
fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some((limiter, address)) = &self.limiter {
            let mut open = limiter.open.lock().expect("limiter lock");
            if let Some(count) = open.get_mut(address) {
                *count -= 1;
                if *count == 0 {
                    open.remove(address);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_per_address_and_given_back() {
        let allowed = vec!["10.0.0.0/8".parse().unwrap()];
        let limiter = Arc::new(ConnectionLimiter::new(2, allowed));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limiter.admit(a).unwrap();
        let _second = limiter.admit(a).unwrap();
        assert!(limiter.admit(a).is_none(), "the third from one address");
        assert!(limiter.admit(b).is_some(), "another address is unaffected");
        // The same address as an IPv4-mapped IPv6 address counts the same.
        assert!(limiter.admit("::ffff:192.0.2.1".parse().unwrap()).is_none());
        drop(first);
        assert_eq!(limiter.open_from(a), 1);
        assert!(
            limiter.admit(a).is_some(),
            "a closed connection frees its place"
        );
        let balancer: Vec<_> = (0..10)
            .map(|_| limiter.admit("10.1.2.3".parse().unwrap()).unwrap())
            .collect();
        assert_eq!(balancer.len(), 10, "allowed networks are not counted");
        let unlimited = Arc::new(ConnectionLimiter::new(0, Vec::new()));
        assert!((0..10).all(|_| unlimited.admit(a).is_some()));
        // An IPv6 /64 counts as one address.
        let one = limiter.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _two = limiter
            .admit("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        assert!(limiter.admit("2001:db8:1:2::77".parse().unwrap()).is_none());
        assert!(limiter.admit("2001:db8:1:3::1".parse().unwrap()).is_some());
        drop(one);
    }

    #[test]
    fn new_connections_are_limited_in_rate_per_address() {
        let limiter = Arc::new(ConnectionLimiter::new(0, Vec::new()).with_rate(3, 60));
        let now = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.admit_at(a, now).is_some());
        }
        assert!(limiter.admit_at(a, now).is_none(), "the burst is spent");
        assert!(limiter.admit_at(b, now).is_some(), "another address is not");
        assert!(
            limiter
                .admit_at(a, now + Duration::from_millis(500))
                .is_none()
        );
        assert!(
            limiter
                .admit_at(a, now + Duration::from_millis(1100))
                .is_some(),
            "one a second"
        );
    }

    #[test]
    fn addresses_are_limited_separately_and_recover() {
        let limiter = AddressLimiter::new(3, 6);
        let now = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.allows(a, now));
            limiter.record(a, now);
        }
        assert!(!limiter.allows(a, now), "the burst is used up");
        assert!(limiter.allows(b, now), "another address is unaffected");
        assert!(!limiter.allows(a, now + Duration::from_secs(5)));
        assert!(
            limiter.allows(a, now + Duration::from_secs(11)),
            "six per minute: one more after ten seconds"
        );
    }

    #[test]
    fn hourly_limits_recover_slowly() {
        let limiter = AddressLimiter::per_hour(2, 6);
        let now = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        limiter.record(a, now);
        limiter.record(a, now);
        assert!(
            !limiter.allows(a, now + Duration::from_secs(60)),
            "six per hour: not after a minute"
        );
        assert!(
            limiter.allows(a, now + Duration::from_secs(601)),
            "one more after ten minutes"
        );
    }

    #[test]
    fn byte_rate_asks_to_wait_once_the_burst_is_spent() {
        let now = Instant::now();
        let mut rate = ByteRate::new(1000, 2000, now);
        assert_eq!(rate.consume(1500, now), Duration::ZERO);
        assert_eq!(rate.consume(1000, now), Duration::from_millis(500));
        assert_eq!(
            rate.consume(0, now + Duration::from_millis(500)),
            Duration::ZERO
        );
    }
}
