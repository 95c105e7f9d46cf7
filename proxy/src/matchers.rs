//! Request matchers shared by every layer that selects requests: routes, JWT requirement
//! rules, RBAC permissions and principals, filter chains (address ranges) and certificate
//! names. Pure data and tests,
//! compiled from Envoy's `RouteMatch`, `HeaderMatcher` and `StringMatcher` by `compile`.

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use std::net::IpAddr;

/// How a string is compared (Envoy's `StringMatcher`, case-sensitive).
#[derive(Debug, Clone)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// The whole name matches.
    Regex(regex::Regex),
}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }

    /// How it reads in a message.
    pub fn describe(&self) -> String {
        match self {
            StringMatch::Exact(s) => format!("exact {s}"),
            StringMatch::Prefix(s) => format!("prefix {s}"),
            StringMatch::Suffix(s) => format!("suffix {s}"),
            StringMatch::Contains(s) => format!("contains {s}"),
            StringMatch::Regex(r) => format!("regex {}", r.as_str()),
        }
    }
}

/// How a route matches the path.
#[derive(Debug)]
pub enum PathMatch {
    /// Path starts with this.
    Prefix(String),
    /// Path equals this.
    Exact(String),
    /// The whole path matches this (anchored at compile time).
    Regex(Regex),
    /// A CONNECT request (Envoy's `connect_matcher`); the other matches never take one.
    Connect,
}

impl PathMatch {
    /// Whether `path` (no query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Regex(regex) => regex.is_match(path),
            PathMatch::Connect => false,
        }
    }
}

/// How a header condition tests a value.
#[derive(Debug, Clone)]
pub enum HeaderValueMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole value matches.
    Regex(Regex),
    /// The header is present.
    Present,
}

/// One header condition of a route (`:method` is matched against the request method).
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower-case header name, or `:method`.
    pub name: HeaderName,
    /// Pseudo-header `:method` rather than a real header.
    pub is_method: bool,
    /// The test.
    pub value: HeaderValueMatch,
    /// Negate the result.
    pub invert: bool,
}

impl HeaderMatch {
    /// Whether the request's method or header values pass (`invert` applied).
    pub fn matches(&self, method: &Method, headers: &HeaderMap) -> bool {
        let result = if self.is_method {
            self.test(Some(method.as_str()))
        } else {
            let mut values = headers.get_all(&self.name).iter().peekable();
            if values.peek().is_none() {
                self.test(None)
            } else {
                values.any(|v| self.test(v.to_str().ok()))
            }
        };
        result != self.invert
    }

    fn test(&self, value: Option<&str>) -> bool {
        match (&self.value, value) {
            (HeaderValueMatch::Present, v) => v.is_some(),
            (_, None) => false,
            (HeaderValueMatch::Exact(e), Some(v)) => v == e,
            (HeaderValueMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (HeaderValueMatch::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// What a request must look like (a route's match, a JWT requirement rule's).
#[derive(Debug)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Header and method conditions, all of which must hold.
    pub headers: Vec<HeaderMatch>,
}

impl RouteMatch {
    /// Whether a request with this path (no query), method and headers matches; a CONNECT
    /// request matches only a `connect_matcher`.
    pub fn matches(&self, path: &str, method: &Method, headers: &HeaderMap) -> bool {
        let path_matches = if *method == Method::CONNECT {
            matches!(self.path, PathMatch::Connect)
        } else {
            self.path.matches(path)
        };
        path_matches && self.headers.iter().all(|h| h.matches(method, headers))
    }
}

/// An IP prefix (`CidrRange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network, with bits past the prefix cleared.
    network: IpAddr,
    /// Prefix length in bits.
    prefix_len: u8,
}

impl Cidr {
    /// The range `address/prefix_len`; `Err` names what is wrong.
    pub fn new(address: IpAddr, prefix_len: u32) -> Result<Cidr, String> {
        let bits = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > bits {
            return Err(format!(
                "{address}/{prefix_len}: the prefix is longer than {bits} bits"
            ));
        }
        let prefix_len = u8::try_from(prefix_len).unwrap_or(128);
        Ok(Cidr {
            network: mask(address, prefix_len),
            prefix_len,
        })
    }

    /// Its prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `address` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        address.is_ipv4() == self.network.is_ipv4()
            && mask(address, self.prefix_len) == self.network
    }
}

fn mask(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & kept).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & kept).into())
        }
    }
}
