//! Which network addresses an image URI may reach.
//!
//! URIs come from whoever can write to the input topic. Left alone, `http://169.254.169.254/...`
//! would read a cloud instance's credentials, and `http://10.0.0.5:6379/` would probe the
//! internal network with dlpipe's own reach (server-side request forgery). So addresses in the
//! loopback, private, link-local, carrier-grade NAT, multicast and reserved ranges are refused,
//! unless `fetch.allowed_networks` lists them. The check is made on every address the host name
//! resolves to, at connection time, by the resolver ureq connects through: so it also holds for
//! every redirect and cannot be dodged by a DNS answer that changes between check and use.
//! A refused address is refused before any connection is tried, whatever its port, so dead
//! letters say nothing about which internal ports are open.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// An IP network in CIDR notation, e.g. `10.1.0.0/16` or `fd00::/8`; a bare address is a /32
/// or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

/// Why a text is not a [`Network`]; the message quotes the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("{text:?} is not an IP address or CIDR network")]
    NotAnAddress { text: String },
    #[error("{text:?}: the prefix length must be a number from 0 to {max}")]
    Prefix { text: String, max: u8 },
}

impl std::str::FromStr for Network {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Network, NetworkError> {
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let address: IpAddr = address.trim().parse().map_err(|_| NetworkError::NotAnAddress { text: text.into() })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| NetworkError::Prefix { text: text.into(), max })?,
            None => max,
        };
        Ok(Network { address, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (bytes, rest) = ((bits / 8) as usize, bits % 8);
    a[..bytes] == b[..bytes] && (rest == 0 || (a[bytes] ^ b[bytes]) >> (8 - rest) == 0)
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Why `ip` is not a public unicast address, or `None` when it is.
pub fn internal_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local (cloud metadata services live here)",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() || a >= 240 => "reserved",
        _ if a == 100 && (64..128).contains(&b) => "carrier-grade NAT (shared)",
        _ if a == 198 && (b == 18 || b == 19) => "benchmarking",
        _ if a == 192 && b == 0 && ip.octets()[2] == 0 => "IETF protocol assignments",
        _ => return None,
    })
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        _ if first & 0xfe00 == 0xfc00 => "unique local (private)",
        _ if first & 0xffc0 == 0xfe80 => "link-local",
        // NAT64 (64:ff9b::/96) carries an IPv4 address: judge that one.
        _ if ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
            let [.., c, d] = ip.segments();
            return v4_reason(Ipv4Addr::from(((c as u32) << 16) | d as u32));
        }
        _ => return None,
    })
}

/// Decides per address; shared by every fetch of a process.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    /// Networks allowed even though they are internal.
    pub allowed: Vec<Network>,
    /// Allow every address (`fetch.allow_internal_addresses`).
    pub allow_all: bool,
}

/// Why the policy refuses an address: it is internal (`kind` says how, as
/// [`internal_reason`]) and no allowed network holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is a {kind} address; internal addresses are refused unless fetch.allowed_networks lists them")]
pub struct Refused {
    pub ip: IpAddr,
    pub kind: &'static str,
}

impl AddressPolicy {
    /// Whether a fetch may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allow_all || self.allowed.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        match internal_reason(ip) {
            Some(kind) => Err(Refused { ip, kind }),
            None => Ok(()),
        }
    }
}

/// The marker in the I/O error the resolver returns, so the fetcher can tell a refusal from a
/// network failure.
pub const REFUSED: &str = "address refused by dlpipe's fetch policy: ";

/// ureq's resolver, with every answer checked against the policy. The HTTP proxy's own address
/// (when one is configured) is not checked: it is the operator's choice, not the URI's.
pub struct CheckedResolver {
    pub policy: AddressPolicy,
    inner: DefaultResolver,
}

impl CheckedResolver {
    pub fn new(policy: AddressPolicy) -> CheckedResolver {
        CheckedResolver { policy, inner: DefaultResolver::default() }
    }
}

impl fmt::Debug for CheckedResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedResolver").field("policy", &self.policy).finish()
    }
}

impl Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addresses = self.inner.resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        if config.proxy().is_some_and(|p| p.host() == host) {
            return Ok(addresses);
        }
        let mut allowed = self.inner.empty();
        allowed.truncate(0);
        let mut refusal = None;
        for address in addresses.iter() {
            match self.policy.check(address.ip()) {
                Ok(()) => allowed.push(*address),
                Err(reason) => refusal = Some(reason),
            }
        }
        match refusal {
            // One internal answer refuses the host: a name that resolves to both a public and
            // an internal address is a classic way round address checks.
            Some(reason) => Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{REFUSED}{host} resolves to {reason}"),
            ))),
            None => Ok(allowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_named_and_public_addresses_pass() {
        for (address, kind) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.31.255.1", "private"),
            ("192.168.0.10", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("fd00::1", "unique local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
        ] {
            let reason = internal_reason(ip(address)).unwrap_or_else(|| panic!("{address} passed"));
            assert!(reason.starts_with(kind), "{address}: {reason}");
        }
        for address in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            assert_eq!(internal_reason(ip(address)), None, "{address}");
        }
    }

    #[test]
    fn allowed_networks_let_chosen_internal_addresses_through() {
        let policy =
            AddressPolicy { allowed: vec!["10.20.0.0/16".parse().unwrap(), "::1".parse().unwrap()], allow_all: false };
        assert!(policy.check(ip("10.20.5.5")).is_ok());
        assert!(policy.check(ip("::1")).is_ok());
        let err = policy.check(ip("10.21.0.1")).unwrap_err().to_string();
        assert!(err.contains("private") && err.contains("fetch.allowed_networks"), "{err}");
        assert!(policy.check(ip("127.0.0.1")).is_err());
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("not-an-ip".parse::<Network>().unwrap_err().to_string().contains("not-an-ip"));
        let n: Network = "192.168.1.0/25".parse().unwrap();
        assert!(n.contains(ip("192.168.1.127")) && !n.contains(ip("192.168.1.128")));
    }
}
