//! Addresses of Nyx's TCP listeners and connections (gdb, metrics, the
//! migration destination, the serial console): one way to write them
//! (`HOST:PORT`, `:PORT` for 127.0.0.1) and one rule for which are local.
//! Every listener is loopback-only unless its `--*-allow-remote` option is
//! given, because none of them but an authenticated migration checks who
//! connects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// Parses `HOST:PORT` (an IP address, `[v6]:PORT` or a host name, resolved
/// to its first address) or `:PORT` (127.0.0.1). `None` when it is none of
/// those.
pub fn parse_addr(spec: &str) -> Option<SocketAddr> {
    if let Some(port) = spec.strip_prefix(':') {
        return port
            .parse()
            .ok()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p));
    }
    if let Ok(a) = spec.parse::<SocketAddr>() {
        return Some(a);
    }
    // Only HOST:PORT goes to the resolver (it would take other forms too).
    let (host, port) = spec.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    spec.to_socket_addrs().ok()?.next()
}

/// Whether `ip` is a loopback address: 127.0.0.0/8, ::1, or 127.x mapped
/// into IPv6 (`::ffff:127.0.0.1`, which the standard library's own check
/// calls remote).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `addr` is not loopback and its remote option was not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{addr} is not a loopback address: use 127.0.0.1, or pass {option} to accept other hosts (anyone who can reach it can connect)")]
pub struct NotLoopback {
    /// The address.
    pub addr: SocketAddr,
    /// The option that allows it, e.g. `--gdb-allow-remote`.
    pub option: &'static str,
}

/// `addr` when it is loopback or `allow_remote`; otherwise the error
/// naming `option`.
pub fn check_local(addr: SocketAddr, allow_remote: bool, option: &'static str) -> Result<SocketAddr, NotLoopback> {
    if allow_remote || is_loopback(addr.ip()) {
        Ok(addr)
    } else {
        Err(NotLoopback { addr, option })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn addresses_in_every_form() {
        assert_eq!(parse_addr(":4444"), Some("127.0.0.1:4444".parse().unwrap()));
        assert_eq!(parse_addr("10.0.0.1:80"), Some("10.0.0.1:80".parse().unwrap()));
        assert_eq!(parse_addr("[::1]:80"), Some("[::1]:80".parse().unwrap()));
        assert!(parse_addr("localhost:80").is_some_and(|a| is_loopback(a.ip()) && a.port() == 80));
        for bad in ["", ":", "1234", ":99999", "127.0.0.1", "127.0.0.1:", ":x", "host:port"] {
            assert_eq!(parse_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_loopback_is_local() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["0.0.0.0", "10.0.0.1", "::", "::ffff:10.0.0.1", "fe80::1"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
        let remote: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let e = check_local(remote, false, "--x-allow-remote").unwrap_err();
        assert!(e.to_string().contains("--x-allow-remote"), "{e}");
        assert_eq!(check_local(remote, true, "--x-allow-remote"), Ok(remote));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(spec in "\\PC{0,40}") {
            let _ = parse_addr(&spec);
        }
    }
}
