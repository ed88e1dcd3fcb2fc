//! The address pool: which MAC holds (or was offered) which address until when. Pure and
//! in memory; the server persists bound leases through the store before acknowledging them.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use nodekeeper_store::{Lease, MacAddr, Timestamp};

/// How long an offered address is held for the client's REQUEST.
pub const OFFER_HOLD_MS: i64 = 60_000;
/// How long a declined address (in use by someone else) is kept out of the pool.
pub const DECLINE_HOLD_MS: i64 = 600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    ip: Ipv4Addr,
    expires_ms: i64,
    bound: bool,
}

/// Why a REQUEST cannot be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address is outside the range and not this MAC's fixed address.
    NotOurs,
    /// Another client holds it.
    Taken,
}

/// The pool of one subnet.
#[derive(Debug, Clone)]
pub struct Pool {
    first: u32,
    last: u32,
    cursor: u32,
    by_mac: HashMap<MacAddr, Slot>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    declined: HashMap<Ipv4Addr, i64>,
    /// Declines per client in the current window: (window start, count).
    decliners: HashMap<MacAddr, (i64, u32)>,
}

/// At most this many declines per client per [`DECLINE_HOLD_MS`]: a client that declines
/// address after address cannot drain the pool.
pub const DECLINES_PER_CLIENT: u32 = 4;

impl Pool {
    /// A pool handing out `first..=last` dynamically.
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Pool {
        Pool {
            first: first.into(),
            last: last.into(),
            cursor: first.into(),
            by_mac: HashMap::new(),
            by_ip: HashMap::new(),
            declined: HashMap::new(),
            decliners: HashMap::new(),
        }
    }

    /// Loads stored leases (at start-up).
    pub fn load(&mut self, leases: &[Lease]) {
        for l in leases {
            self.set(l.mac, Slot { ip: l.ip, expires_ms: l.expires_at.0, bound: true });
        }
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    /// Whether `ip` may go to `mac` now: nobody else holds it unexpired, it is not declined.
    fn available(&self, ip: Ipv4Addr, mac: MacAddr, now: i64) -> bool {
        if self.declined.get(&ip).is_some_and(|&until| until > now) {
            return false;
        }
        match self.by_ip.get(&ip) {
            Some(holder) if *holder != mac => self.by_mac.get(holder).is_none_or(|s| s.expires_ms <= now),
            _ => true,
        }
    }

    fn set(&mut self, mac: MacAddr, slot: Slot) {
        if let Some(old) = self.by_mac.insert(mac, slot) {
            if old.ip != slot.ip && self.by_ip.get(&old.ip) == Some(&mac) {
                self.by_ip.remove(&old.ip);
            }
        }
        if let Some(prev) = self.by_ip.insert(slot.ip, mac) {
            if prev != mac {
                self.by_mac.remove(&prev);
            }
        }
    }

    /// Chooses an address for a DISCOVER and holds it briefly: the fixed address if the host
    /// has one, else what this MAC had, else the address it asks for, else the next free one.
    /// `None` when the range is exhausted (or the fixed address is held by someone else).
    pub fn offer(
        &mut self,
        mac: MacAddr,
        fixed: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
        now: i64,
    ) -> Option<Ipv4Addr> {
        let ip = if let Some(f) = fixed {
            self.available(f, mac, now).then_some(f)?
        } else if let Some(s) = self.by_mac.get(&mac).filter(|s| self.in_range(s.ip) && self.available(s.ip, mac, now))
        {
            s.ip
        } else if let Some(r) = requested.filter(|&r| self.in_range(r) && self.available(r, mac, now)) {
            r
        } else {
            self.next_free(mac, now)?
        };
        let keep_bound = self.by_mac.get(&mac).is_some_and(|s| s.ip == ip && s.bound && s.expires_ms > now);
        if !keep_bound {
            self.set(mac, Slot { ip, expires_ms: now + OFFER_HOLD_MS, bound: false });
        }
        Some(ip)
    }

    fn next_free(&mut self, mac: MacAddr, now: i64) -> Option<Ipv4Addr> {
        let size = self.last - self.first + 1;
        for _ in 0..size {
            let ip = Ipv4Addr::from(self.cursor);
            self.cursor = if self.cursor >= self.last { self.first } else { self.cursor + 1 };
            if self.available(ip, mac, now) {
                return Some(ip);
            }
        }
        None
    }

    /// Binds `ip` to `mac` for `lease_ms` (a REQUEST). Returns the lease to persist.
    pub fn bind(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        fixed: Option<Ipv4Addr>,
        lease_ms: i64,
        now: i64,
    ) -> Result<Lease, Refused> {
        if fixed.is_some_and(|f| f != ip) || (fixed.is_none() && !self.in_range(ip)) {
            return Err(Refused::NotOurs);
        }
        if !self.available(ip, mac, now) {
            return Err(Refused::Taken);
        }
        let expires_ms = now + lease_ms;
        self.set(mac, Slot { ip, expires_ms, bound: true });
        Ok(Lease { mac, ip, expires_at: Timestamp(expires_ms) })
    }

    /// The address bound to `mac`, if its lease is current.
    pub fn bound(&self, mac: MacAddr, now: i64) -> Option<Ipv4Addr> {
        self.by_mac.get(&mac).filter(|s| s.bound && s.expires_ms > now).map(|s| s.ip)
    }

    /// Frees `mac`'s address if it is `ip` (DHCPRELEASE). Returns whether anything changed.
    pub fn release(&mut self, mac: MacAddr, ip: Ipv4Addr) -> bool {
        match self.by_mac.get(&mac) {
            Some(s) if s.ip == ip => {
                self.by_mac.remove(&mac);
                self.by_ip.remove(&ip);
                true
            }
            _ => false,
        }
    }

    /// Whether `ip` is offered or leased to `mac` now.
    pub fn holds(&self, mac: MacAddr, ip: Ipv4Addr) -> bool {
        self.by_mac.get(&mac).is_some_and(|s| s.ip == ip) && self.by_ip.get(&ip) == Some(&mac)
    }

    /// Takes `ip` out of the pool for a while: a client found it in use (DHCPDECLINE). Only
    /// an address the pool offered or leased to `mac` (so nobody can block another host's
    /// address, a fixed one included), and at most [`DECLINES_PER_CLIENT`] per client per
    /// hold period; `false` when refused.
    pub fn decline(&mut self, mac: MacAddr, ip: Ipv4Addr, now: i64) -> bool {
        if !self.holds(mac, ip) {
            return false;
        }
        let (since, count) = self.decliners.entry(mac).or_insert((now, 0));
        if now - *since >= DECLINE_HOLD_MS {
            (*since, *count) = (now, 0);
        }
        if *count >= DECLINES_PER_CLIENT {
            return false;
        }
        *count += 1;
        self.release(mac, ip);
        self.declined.insert(ip, now + DECLINE_HOLD_MS);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 20, 0, n)
    }

    #[test]
    fn offers_are_stable_and_distinct() {
        let mut p = Pool::new(ip(100), ip(102));
        let a = p.offer(mac(1), None, None, 0).expect("a");
        assert_eq!(p.offer(mac(1), None, None, 10), Some(a), "the same MAC gets the same offer");
        let b = p.offer(mac(2), None, Some(a), 10).expect("b");
        assert_ne!(a, b, "a held offer is not given to another MAC");
        let c = p.offer(mac(3), None, Some(ip(102)), 10).expect("c");
        assert_eq!(c, ip(102), "a free requested address is honoured");
        assert_eq!(p.offer(mac(4), None, None, 10), None, "exhausted");
        assert!(p.offer(mac(4), None, None, OFFER_HOLD_MS + 11).is_some(), "unclaimed offers expire");
    }

    #[test]
    fn binding_renewing_and_conflicts() {
        let mut p = Pool::new(ip(100), ip(199));
        let a = p.offer(mac(1), None, None, 0).expect("offer");
        let lease = p.bind(mac(1), a, None, 3_600_000, 5).expect("bind");
        assert_eq!((lease.mac, lease.ip, lease.expires_at.0), (mac(1), a, 3_600_005));
        assert_eq!(p.bound(mac(1), 10), Some(a));
        assert_eq!(p.bind(mac(2), a, None, 1000, 10), Err(Refused::Taken));
        assert_eq!(p.bind(mac(2), ip(50), None, 1000, 10), Err(Refused::NotOurs));
        assert_eq!(p.offer(mac(1), None, None, 20), Some(a), "a bound client is offered its address again");
        assert!(p.bind(mac(1), a, None, 3_600_000, 1_000_000).is_ok(), "renewal");
        assert!(p.release(mac(1), a));
        assert!(p.bind(mac(2), a, None, 1000, 1_000_001).is_ok(), "released addresses are reused");
    }

    #[test]
    fn fixed_addresses_and_declines() {
        let mut p = Pool::new(ip(100), ip(101));
        assert_eq!(p.offer(mac(1), Some(ip(11)), None, 0), Some(ip(11)), "fixed address, outside the range");
        assert!(p.bind(mac(1), ip(11), Some(ip(11)), 1000, 0).is_ok());
        assert_eq!(
            p.bind(mac(1), ip(100), Some(ip(11)), 1000, 0),
            Err(Refused::NotOurs),
            "a host with a fixed address gets only that"
        );
        let d = p.offer(mac(2), None, None, 0).expect("offer");
        assert!(!p.decline(mac(3), d, 0), "nobody declines an address offered to another");
        assert!(!p.decline(mac(2), ip(11), 0), "nor a host's fixed address");
        assert!(p.decline(mac(2), d, 0));
        let other = p.offer(mac(2), None, None, 1).expect("another");
        assert_ne!(other, d, "a declined address is skipped");
    }

    #[test]
    fn declines_are_rate_limited_per_client() {
        let mut p = Pool::new(ip(100), ip(199));
        let mut declined = 0;
        for t in 0..20 {
            let a = p.offer(mac(7), None, None, t).expect("offer");
            declined += u32::from(p.decline(mac(7), a, t));
        }
        assert_eq!(declined, DECLINES_PER_CLIENT, "a client cannot drain the pool");
        let a = p.offer(mac(7), None, None, DECLINE_HOLD_MS + 100).expect("offer");
        assert!(p.decline(mac(7), a, DECLINE_HOLD_MS + 100), "a new window");
    }

    #[test]
    fn stored_leases_survive_a_restart() {
        let mut p = Pool::new(ip(100), ip(199));
        p.load(&[Lease { mac: mac(1), ip: ip(150), expires_at: Timestamp(10_000) }]);
        assert_eq!(p.offer(mac(1), None, None, 0), Some(ip(150)));
        assert_ne!(p.offer(mac(2), None, Some(ip(150)), 0), Some(ip(150)), "never handed out twice");
    }
}
