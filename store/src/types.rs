//! Newtypes for the identifiers and enumerations of the data model, so a host name is never
//! passed where an instance UUID is expected and a state is never a magic string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A value that does not parse as the type it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct ParseError {
    /// What was being parsed ("host name", "MAC address", ...).
    pub what: &'static str,
    /// The offending input (never a secret).
    pub value: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl ParseError {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        Self { what, value: value.to_owned(), reason }
    }
}

/// A host's unique name, as the guard's `host` config key and the host table know it.
///
/// Letters, digits, `-`, `_` and `.`, 1 to 253 characters, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const WHAT: &str = "host name";
        let first = s.chars().next().ok_or_else(|| ParseError::new(WHAT, s, "empty"))?;
        if s.len() > 253 {
            return Err(ParseError::new(WHAT, s, "longer than 253 characters"));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(ParseError::new(WHAT, s, "must start with a letter or digit"));
        }
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(ParseError::new(WHAT, s, "only letters, digits, '-', '_' and '.' are allowed"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for HostName {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<HostName> for String {
    fn from(h: HostName) -> String {
        h.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instance's UUID: libvirt's `<uuid>`, Nova's instance id. Stored and shown in the
/// canonical lower-case hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceId(Uuid);

impl InstanceId {
    /// Wraps a UUID.
    pub fn new(uuid: Uuid) -> Self {
        Self(uuid)
    }
    /// A fresh random (v4) id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }
    /// The UUID inside.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl FromStr for InstanceId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        // libvirt accepts UUIDs with or without hyphens and in any case; so do we.
        Uuid::parse_str(s.trim()).map(Self).map_err(|_| ParseError::new("instance UUID", s, "not a UUID"))
    }
}

impl TryFrom<String> for InstanceId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<InstanceId> for String {
    fn from(i: InstanceId) -> String {
        i.to_string()
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// An instance's generation: +1 on every change of owner, in the same transaction.
/// A copy of an instance whose generation is behind the database's is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation of a newly created instance.
    pub const FIRST: Generation = Generation(1);

    /// The generation after one more change of owner.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }

    pub(crate) fn to_db(self) -> i64 {
        // The schema's CHECK keeps it non-negative; i64::MAX changes of owner will not happen.
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    pub(crate) fn from_db(v: i64) -> Generation {
        Generation(u64::try_from(v).unwrap_or(0))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An Ethernet MAC address, shown as lower-case `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const WHAT: &str = "MAC address";
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(|| ParseError::new(WHAT, s, "expected six octets"))?;
            if part.len() != 2 {
                return Err(ParseError::new(WHAT, s, "each octet is two hex digits"));
            }
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| ParseError::new(WHAT, s, "each octet is two hex digits"))?;
        }
        if parts.next().is_some() {
            return Err(ParseError::new(WHAT, s, "expected six octets"));
        }
        Ok(Self(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Declares a closed set of states persisted as text, with `as_str`, `FromStr`, `Display`
/// and serde as the same lower-case words the schema's CHECK constraint lists.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The persisted (and displayed) word.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseError::new($what, s, concat!("expected one of:", $(" ", $text,)+))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where a host is in its lifecycle.
    HostState, "host state" {
        /// Heartbeating and eligible to own instances.
        Active = "active",
        /// Silent past the grace period; not yet fenced.
        Suspect = "suspect",
        /// Powered off through its BMC (or marked so by an operator); its instances may move.
        Fenced = "fenced",
        /// Being reinstalled over PXE.
        Reimaging = "reimaging",
        /// Taken out of service by an operator.
        Maintenance = "maintenance",
    }
}

text_enum! {
    /// How a host's firmware boots (metal3's `BootMode`): the BMC's boot override is set in
    /// this mode, and a `uefi-secureboot` host is PXE-booted through the signed chain (shim →
    /// GRUB → the deploy kernel) instead of iPXE.
    BootMode, "boot mode" {
        /// Legacy BIOS (or UEFI's compatibility module).
        Bios = "bios",
        /// UEFI without Secure Boot.
        Uefi = "uefi",
        /// UEFI with Secure Boot enforcing.
        UefiSecureBoot = "uefi-secureboot",
    }
}

text_enum! {
    /// How a host's deploy ramdisk reaches it (Ironic's boot interfaces): the firmware's PXE
    /// (TFTP for the first loader), the firmware's UEFI HTTP boot (no TFTP), or a per-reimage
    /// ISO the BMC attaches as virtual media (no DHCP of ours either).
    BootPath, "boot path" {
        /// PXE: DHCP, then the first loader over TFTP.
        Pxe = "pxe",
        /// UEFI HTTP boot: DHCP (vendor class `HTTPClient`), then every file over HTTP.
        Http = "http",
        /// Redfish virtual media: the BMC attaches an ISO built for this reimage.
        VirtualMedia = "virtual-media",
    }
}

#[allow(clippy::derivable_impls)] // the macro derives a fixed set of traits
impl Default for BootPath {
    fn default() -> BootPath {
        BootPath::Pxe
    }
}

impl BootMode {
    /// Whether the firmware is UEFI (with or without Secure Boot).
    pub fn is_uefi(self) -> bool {
        self != BootMode::Bios
    }
}

text_enum! {
    /// Where an instance's disks live, which decides how it is recovered elsewhere.
    Storage, "storage" {
        /// A shared filesystem every host mounts: restart the same disk.
        Shared = "shared",
        /// A network block volume: reattach and restart the same disk.
        Volume = "volume",
        /// Local disk: reprovision the same identity (UUID, name, MAC) on a new disk.
        Local = "local",
    }
}

text_enum! {
    /// Where a multi-step operation stands.
    OperationStatus, "operation status" {
        /// Still being worked on (at most one per kind and target).
        Running = "running",
        /// Finished successfully.
        Done = "done",
        /// Gave up; `last_error` says why and `step` where.
        Failed = "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_both_separators_and_prints_canonically() {
        let a: MacAddr = "52:54:00:AB:cd:01".parse().expect("colon form");
        let b: MacAddr = "52-54-00-ab-CD-01".parse().expect("dash form");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "52:54:00:ab:cd:01");
        for bad in
            ["", "52:54:00:ab:cd", "52:54:00:ab:cd:01:02", "52:54:00:ab:cd:0g", "5254.00ab.cd01", "525:4:00:ab:cd:01"]
        {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn host_names_are_validated() {
        for good in ["node-a", "n1", "rack3.node_07"] {
            assert_eq!(good.parse::<HostName>().expect(good).as_str(), good);
        }
        for bad in ["", "-node", "node a", "node/a", "nöde", &"x".repeat(254)] {
            assert!(bad.parse::<HostName>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn instance_ids_are_canonical() {
        let id: InstanceId = "6F1B2C3D4E5F40718293A4B5C6D7E8F9".parse().expect("simple form");
        assert_eq!(id.to_string(), "6f1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9");
        assert!("not-a-uuid".parse::<InstanceId>().is_err());
    }

    #[test]
    fn text_enums_round_trip() {
        for s in HostState::ALL {
            assert_eq!(s.as_str().parse::<HostState>(), Ok(*s));
        }
        for s in Storage::ALL {
            assert_eq!(s.as_str().parse::<Storage>(), Ok(*s));
        }
        let err = "nfs".parse::<Storage>().expect_err("unknown storage");
        assert_eq!(err.to_string(), "invalid storage \"nfs\": expected one of: shared volume local");
    }
}

impl std::ops::Add<std::time::Duration> for Timestamp {
    type Output = Timestamp;
    /// Saturating: a duration past the representable range gives the far future.
    fn add(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }
}

impl std::ops::Sub<std::time::Duration> for Timestamp {
    type Output = Timestamp;
    /// Saturating, as [`Add`](std::ops::Add).
    fn sub(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }
}

/// A point in time, stored as milliseconds since the Unix epoch and shown as RFC 3339 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// How long after `earlier` this is; zero when it is not after.
    pub fn since(self, earlier: Timestamp) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }

    /// Now, by this process's wall clock. Never compare it with a time from the database
    /// (a heartbeat, a lease, a deadline): use `Store::now`, the database server's time.
    pub fn now() -> Timestamp {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }

    /// As a `SystemTime` (times before the epoch clamp to it).
    pub fn to_system_time(self) -> std::time::SystemTime {
        let ms = u64::try_from(self.0).unwrap_or(0);
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&humantime::format_rfc3339_millis(self.to_system_time()), f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
