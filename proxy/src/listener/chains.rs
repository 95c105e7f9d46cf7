//! Envoy's filter chain match: which of a listener's filter chains takes a connection.
//!
//! The criteria are tried in Envoy's order — destination port, destination IP
//! (`prefix_ranges`), server name, transport protocol, application protocols, directly
//! connected source IP, source type, source IP, source port — and at each one the most
//! specific chains that match stay (an exact port before no port, the longest prefix,
//! an exact name before the longest wildcard suffix, …; a chain that leaves a criterion
//! unset matches anything there, but only when no chain is more specific). As in Envoy the
//! choice never backtracks: once a more specific chain matched a criterion, the others are
//! out even if a later criterion then rules the specific one out too.

use super::inspect::Detected;
use crate::matchers::Cidr;
use std::net::{IpAddr, SocketAddr};

/// `source_type`: where the connection comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceType {
    /// Anywhere.
    #[default]
    Any,
    /// This host: a loopback source, or the source is the destination's IP.
    SameIpOrLoopback,
    /// Anywhere else.
    External,
}

/// One filter chain's `filter_chain_match`, with its lists sorted so that two chains
/// asking for the same thing compare equal (Envoy refuses such a listener).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ChainMatch {
    /// `destination_port`.
    pub destination_port: Option<u16>,
    /// `prefix_ranges` (destination IP).
    pub prefix_ranges: Vec<Cidr>,
    /// `server_names`: exact names and `*.suffix` wildcards, lower case.
    pub server_names: Vec<String>,
    /// `transport_protocol` (`tls`, `raw_buffer`).
    pub transport_protocol: Option<String>,
    /// `application_protocols`.
    pub application_protocols: Vec<String>,
    /// `direct_source_prefix_ranges`.
    pub direct_source_prefix_ranges: Vec<Cidr>,
    /// `source_type`.
    pub source_type: SourceType,
    /// `source_prefix_ranges`.
    pub source_prefix_ranges: Vec<Cidr>,
    /// `source_ports`.
    pub source_ports: Vec<u16>,
}

impl ChainMatch {
    /// Sorts and de-duplicates the lists (see the type's doc).
    pub fn normalized(mut self) -> ChainMatch {
        self.prefix_ranges.sort();
        self.prefix_ranges.dedup();
        self.server_names.sort();
        self.server_names.dedup();
        self.application_protocols.sort();
        self.application_protocols.dedup();
        self.direct_source_prefix_ranges.sort();
        self.direct_source_prefix_ranges.dedup();
        self.source_prefix_ranges.sort();
        self.source_prefix_ranges.dedup();
        self.source_ports.sort_unstable();
        self.source_ports.dedup();
        self
    }
}

/// What a connection offers to the match: where it was going, where it comes from, and
/// what the listener filters saw.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// The destination (the original destination on a `use_original_dst` listener).
    pub destination: SocketAddr,
    /// The peer.
    pub source: SocketAddr,
    /// What the inspectors found (nothing without listener filters).
    pub detected: &'a Detected,
}

/// How well a chain matches one criterion: `None` not at all, `Some(0)` it leaves the
/// criterion unset, higher is more specific.
type Specificity = Option<u32>;

fn longest_prefix(ranges: &[Cidr], address: IpAddr) -> Specificity {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|r| r.contains(address))
        .map(|r| u32::from(r.prefix_len()) + 1)
        .max()
}

fn server_name(names: &[String], sni: Option<&str>) -> Specificity {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|name| match name.strip_prefix('*') {
            // "*.example.com" takes any name under example.com, longer suffixes first.
            Some(suffix) if sni.len() > suffix.len() && sni.ends_with(suffix) => {
                u32::try_from(suffix.len()).ok()
            }
            Some(_) => None,
            None if name == sni => Some(u32::MAX),
            None => None,
        })
        .max()
}

fn is_local(facts: &ConnectionFacts<'_>) -> bool {
    let source = facts.source.ip().to_canonical();
    source.is_loopback() || source == facts.destination.ip().to_canonical()
}

/// The criteria in Envoy's order.
const CRITERIA: [fn(&ChainMatch, &ConnectionFacts<'_>) -> Specificity; 9] = [
    |m, f| match m.destination_port {
        None => Some(0),
        Some(port) => (port == f.destination.port()).then_some(1),
    },
    |m, f| longest_prefix(&m.prefix_ranges, f.destination.ip()),
    |m, f| server_name(&m.server_names, f.detected.server_name.as_deref()),
    |m, f| match &m.transport_protocol {
        None => Some(0),
        Some(p) => {
            let seen = if f.detected.tls { "tls" } else { "raw_buffer" };
            (p == seen).then_some(1)
        }
    },
    |m, f| {
        if m.application_protocols.is_empty() {
            return Some(0);
        }
        let offered = &f.detected.application_protocols;
        m.application_protocols
            .iter()
            .any(|p| offered.contains(p))
            .then_some(1)
    },
    |m, f| longest_prefix(&m.direct_source_prefix_ranges, f.source.ip()),
    |m, f| match m.source_type {
        SourceType::Any => Some(0),
        SourceType::SameIpOrLoopback => is_local(f).then_some(1),
        SourceType::External => (!is_local(f)).then_some(1),
    },
    |m, f| longest_prefix(&m.source_prefix_ranges, f.source.ip()),
    |m, f| {
        if m.source_ports.is_empty() {
            Some(0)
        } else {
            m.source_ports.contains(&f.source.port()).then_some(1)
        }
    },
];

/// The index of the chain in `chains` that takes the connection (`match_of` gives each
/// one's match), `None` when none does (the listener's `default_filter_chain` then, if it
/// has one). One allocation per connection: the surviving candidates.
pub fn select<T>(
    chains: &[T],
    match_of: impl Fn(&T) -> &ChainMatch,
    facts: &ConnectionFacts<'_>,
) -> Option<usize> {
    let mut candidates: Vec<usize> = (0..chains.len()).collect();
    for criterion in CRITERIA {
        let score = |i: &usize| criterion(match_of(&chains[*i]), facts);
        let best = candidates.iter().filter_map(score).max()?;
        candidates.retain(|i| score(i) == Some(best));
    }
    // Equal matches are refused when the listener is compiled, so one is left.
    candidates.first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        let (ip, len) = s.split_once('/').unwrap();
        Cidr::new(ip.parse().unwrap(), len.parse().unwrap()).unwrap()
    }

    fn facts<'a>(destination: &str, source: &str, detected: &'a Detected) -> ConnectionFacts<'a> {
        ConnectionFacts {
            destination: destination.parse().unwrap(),
            source: source.parse().unwrap(),
            detected,
        }
    }

    fn tls(sni: &str, alpn: &[&str]) -> Detected {
        Detected {
            tls: true,
            server_name: Some(sni.into()),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn cidr_ranges_hold_what_they_should() {
        assert!(cidr("10.0.0.0/8").contains("10.1.2.3".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(cidr("10.1.2.3/32").contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(cidr("fd00::/8").contains("fd12::1".parse().unwrap()));
        assert!(!cidr("fd00::/8").contains("10.0.0.1".parse().unwrap()));
        assert_eq!(cidr("10.1.2.3/16"), cidr("10.1.0.0/16"));
        assert!(Cidr::new("10.0.0.0".parse().unwrap(), 33).is_err());
    }

    #[test]
    fn an_istio_style_inbound_listener_picks_by_port_then_protocol() {
        let chains = [
            // 0: mTLS HTTP on 8080
            ChainMatch {
                destination_port: Some(8080),
                transport_protocol: Some("tls".into()),
                application_protocols: vec!["istio-http/1.1".into(), "h2".into()],
                ..Default::default()
            },
            // 1: plaintext HTTP on 8080
            ChainMatch {
                destination_port: Some(8080),
                transport_protocol: Some("raw_buffer".into()),
                application_protocols: vec!["http/1.1".into(), "h2c".into()],
                ..Default::default()
            },
            // 2: anything else in plaintext on 8080 (opaque TCP)
            ChainMatch {
                destination_port: Some(8080),
                transport_protocol: Some("raw_buffer".into()),
                ..Default::default()
            },
            // 3: every other port, passthrough
            ChainMatch::default(),
        ];
        let pick = |d: &Detected, port: u16| {
            select(
                &chains,
                |m| m,
                &facts(&format!("10.0.0.5:{port}"), "10.0.0.9:5000", d),
            )
        };
        assert_eq!(pick(&tls("x", &["h2"]), 8080), Some(0));
        let http = Detected {
            application_protocols: vec!["http/1.1".into()],
            ..Default::default()
        };
        assert_eq!(pick(&http, 8080), Some(1));
        assert_eq!(pick(&Detected::default(), 8080), Some(2));
        // TLS with an ALPN the mTLS chain does not take: not chain 1 (raw_buffer) either,
        // and no backtracking to the port-wide chain 2 past transport_protocol.
        assert_eq!(pick(&tls("x", &["postgresql"]), 8080), None);
        assert_eq!(pick(&http, 9090), Some(3));
    }

    #[test]
    fn exact_names_beat_wildcards_and_longer_wildcards_beat_shorter() {
        let chains = [
            ChainMatch {
                server_names: vec!["*.example.com".into()],
                ..Default::default()
            },
            ChainMatch {
                server_names: vec!["*.api.example.com".into()],
                ..Default::default()
            },
            ChainMatch {
                server_names: vec!["www.example.com".into()],
                ..Default::default()
            },
            ChainMatch::default(),
        ];
        let pick = |sni: &str| {
            let d = tls(sni, &[]);
            select(&chains, |m| m, &facts("10.0.0.1:443", "1.2.3.4:1000", &d))
        };
        assert_eq!(pick("www.example.com"), Some(2));
        assert_eq!(pick("v1.api.example.com"), Some(1));
        assert_eq!(pick("a.b.example.com"), Some(0));
        assert_eq!(pick("example.com"), Some(3));
        let plain = Detected::default();
        assert_eq!(
            select(
                &chains,
                |m| m,
                &facts("10.0.0.1:443", "1.2.3.4:1000", &plain)
            ),
            Some(3)
        );
    }

    #[test]
    fn the_longest_destination_prefix_wins_and_sources_narrow_after() {
        let chains = [
            ChainMatch {
                prefix_ranges: vec![cidr("10.0.0.0/8")],
                ..Default::default()
            },
            ChainMatch {
                prefix_ranges: vec![cidr("10.96.0.0/12")],
                source_type: SourceType::SameIpOrLoopback,
                ..Default::default()
            },
            ChainMatch {
                prefix_ranges: vec![cidr("10.96.0.0/12")],
                source_prefix_ranges: vec![cidr("192.168.0.0/16")],
                ..Default::default()
            },
            ChainMatch {
                source_ports: vec![7000],
                ..Default::default()
            },
        ];
        let d = Detected::default();
        let pick = |dst: &str, src: &str| select(&chains, |m| m, &facts(dst, src, &d));
        assert_eq!(pick("10.1.0.1:80", "8.8.8.8:1"), Some(0));
        assert_eq!(pick("10.96.0.10:80", "127.0.0.1:1"), Some(1));
        assert_eq!(pick("10.96.0.10:80", "192.168.1.1:1"), Some(2));
        assert_eq!(pick("10.96.0.10:80", "8.8.8.8:1"), None);
        assert_eq!(pick("172.16.0.1:80", "8.8.8.8:7000"), Some(3));
        assert_eq!(pick("172.16.0.1:80", "8.8.8.8:7001"), None);
    }

    #[test]
    fn equal_matches_compare_equal_whatever_the_order_of_their_lists() {
        let a = ChainMatch {
            server_names: vec!["b".into(), "a".into()],
            source_ports: vec![2, 1, 2],
            ..Default::default()
        };
        let b = ChainMatch {
            server_names: vec!["a".into(), "b".into()],
            source_ports: vec![1, 2],
            ..Default::default()
        };
        assert_ne!(a, b);
        assert_eq!(a.normalized(), b.normalized());
    }
}
