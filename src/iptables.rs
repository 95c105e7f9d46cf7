//! `nip iptables`: the rules that send a pod's TCP traffic through its NIP sidecar, in the
//! style of istio-iptables and linkerd2-proxy-init (own chains in the `nat` table).
//!
//! ```text
//! inbound:  PREROUTING ─▶ NIP_INBOUND ─(excluded ports RETURN)─▶ NIP_IN_REDIRECT ─▶ REDIRECT :inbound_port
//! outbound: OUTPUT ─▶ NIP_OUTPUT ─(the proxy's UID, loopback, excluded CIDRs and ports RETURN)─▶
//!           NIP_REDIRECT ─▶ REDIRECT :outbound_port
//! ```
//!
//! The proxy reads where a redirected connection was going with `SO_ORIGINAL_DST`. Its own
//! connections (its UID) are never redirected, so they do not loop. `cleanup` removes the
//! jumps and the chains and nothing else. The rules are built as data ([`Rules`]) and run
//! one `iptables` command at a time; `--dry-run` prints them instead.

use std::net::IpAddr;
use std::process::Command;

/// The chains NIP owns in the `nat` table.
const CHAINS: [&str; 4] = [
    "NIP_INBOUND",
    "NIP_IN_REDIRECT",
    "NIP_OUTPUT",
    "NIP_REDIRECT",
];

/// What `setup` redirects, and what it leaves alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    /// The UID the proxy runs as: its own connections are never redirected.
    pub proxy_uid: u32,
    /// Where inbound connections are sent (the proxy's inbound listener).
    pub inbound_port: u16,
    /// Where outbound connections are sent (the proxy's outbound listener).
    pub outbound_port: u16,
    /// Inbound destination ports left alone (SSH, the proxy's admin port, …).
    pub inbound_ports_excluded: Vec<u16>,
    /// Outbound destination ports left alone.
    pub outbound_ports_excluded: Vec<u16>,
    /// Outbound destinations left alone (`10.0.0.0/8`, `169.254.169.254/32`, …).
    pub outbound_cidrs_excluded: Vec<Cidr>,
}

/// An address range, `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network's address.
    pub address: IpAddr,
    /// How many leading bits are the network's.
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = text.split_once('/').unwrap_or((text, ""));
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not ADDRESS/PREFIX (no IP address)"))?;
        let most = if address.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            most
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= most)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {most}"))?
        };
        Ok(Cidr { address, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// One `iptables` invocation: its arguments.
pub type Rule = Vec<String>;

/// `iptables -t nat OPERATION CHAIN SPEC…`: `spec` is split on spaces (every value put in
/// it — ports, CIDRs, a UID — is a checked number or address, never free text).
fn nat(operation: &str, chain: &str, spec: &str) -> Rule {
    ["-t", "nat", operation, chain]
        .into_iter()
        .chain(spec.split_whitespace())
        .map(str::to_string)
        .collect()
}

/// Which IP version a set of rules is for (`iptables` or `ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`iptables`).
    V4,
    /// IPv6 (`ip6tables`).
    V6,
}

impl Family {
    /// The loopback range, never redirected outbound.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The binary for this family: `iptables-nft` → `ip6tables-nft`, and so on.
    pub fn binary(self, iptables: &str) -> String {
        match self {
            Family::V4 => iptables.to_string(),
            Family::V6 => match iptables.rsplit_once('/') {
                Some((dir, name)) => format!("{dir}/{}", name.replacen("iptables", "ip6tables", 1)),
                None => iptables.replacen("iptables", "ip6tables", 1),
            },
        }
    }
}

/// The rules of `setup` for one IP family, in the order they run (CIDRs of the other
/// family are skipped).
pub fn setup_rules(plan: &Interception, family: Family) -> Vec<Rule> {
    let mut rules: Vec<Rule> = CHAINS.iter().map(|c| nat("-N", c, "")).collect();
    let (inbound, outbound) = (plan.inbound_port, plan.outbound_port);
    rules.push(nat(
        "-A",
        "NIP_IN_REDIRECT",
        &format!("-p tcp -j REDIRECT --to-ports {inbound}"),
    ));
    rules.push(nat(
        "-A",
        "NIP_REDIRECT",
        &format!("-p tcp -j REDIRECT --to-ports {outbound}"),
    ));
    // Inbound: everything but the excluded ports.
    rules.push(nat("-A", "PREROUTING", "-p tcp -j NIP_INBOUND"));
    for port in &plan.inbound_ports_excluded {
        rules.push(nat(
            "-A",
            "NIP_INBOUND",
            &format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    rules.push(nat("-A", "NIP_INBOUND", "-p tcp -j NIP_IN_REDIRECT"));
    // Outbound: not the proxy's own, not loopback, not the excluded.
    rules.push(nat("-A", "OUTPUT", "-p tcp -j NIP_OUTPUT"));
    let uid = plan.proxy_uid;
    rules.push(nat(
        "-A",
        "NIP_OUTPUT",
        &format!("-m owner --uid-owner {uid} -j RETURN"),
    ));
    let loopback = family.loopback();
    rules.push(nat("-A", "NIP_OUTPUT", &format!("-d {loopback} -j RETURN")));
    for cidr in plan
        .outbound_cidrs_excluded
        .iter()
        .filter(|c| c.address.is_ipv4() == (family == Family::V4))
    {
        rules.push(nat("-A", "NIP_OUTPUT", &format!("-d {cidr} -j RETURN")));
    }
    for port in &plan.outbound_ports_excluded {
        rules.push(nat(
            "-A",
            "NIP_OUTPUT",
            &format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    rules.push(nat("-A", "NIP_OUTPUT", "-j NIP_REDIRECT"));
    rules
}

/// The rules of `cleanup`: the jumps into NIP's chains, then the chains (each may already
/// be gone: cleanup after a partial setup, or twice, is not an error).
pub fn cleanup_rules() -> Vec<Rule> {
    let mut rules = vec![
        nat("-D", "PREROUTING", "-p tcp -j NIP_INBOUND"),
        nat("-D", "OUTPUT", "-p tcp -j NIP_OUTPUT"),
    ];
    rules.extend(CHAINS.iter().map(|c| nat("-F", c, "")));
    rules.extend(CHAINS.iter().map(|c| nat("-X", c, "")));
    rules
}

/// Why the rules could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The iptables binary could not be run.
    #[error(
        "cannot run {binary}: {reason} (install iptables, or name the binary with --iptables)"
    )]
    Missing {
        /// The binary.
        binary: String,
        /// What the system said.
        reason: String,
    },
    /// A rule was refused; the ones before it stay.
    #[error("{binary} {rule}: {reason} (the rules before it stay: `nip iptables cleanup` removes them, also after an earlier setup)")]
    Refused {
        /// The binary.
        binary: String,
        /// The refused rule.
        rule: String,
        /// What iptables said.
        reason: String,
    },
}

/// Runs `rules` with `binary` (`iptables`, `iptables-legacy`, `iptables-nft`) in order;
/// with `tolerate_missing`, a rule about a chain or jump that is not there is skipped.
pub fn run(binary: &str, rules: &[Rule], tolerate_missing: bool) -> Result<(), IptablesError> {
    for rule in rules {
        let output =
            Command::new(binary)
                .args(rule)
                .output()
                .map_err(|e| IptablesError::Missing {
                    binary: binary.to_string(),
                    reason: e.to_string(),
                })?;
        if output.status.success() {
            continue;
        }
        let reason = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let missing = ["No chain", "does not exist", "Bad rule", "No such file"]
            .iter()
            .any(|m| reason.contains(m));
        if tolerate_missing && missing {
            continue;
        }
        return Err(IptablesError::Refused {
            binary: binary.to_string(),
            rule: rule.join(" "),
            reason,
        });
    }
    Ok(())
}

/// The rules as shell lines (what `--dry-run` prints).
pub fn shell_lines(binary: &str, rules: &[Rule]) -> String {
    rules
        .iter()
        .map(|r| format!("{binary} {}\n", r.join(" ")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Interception {
        Interception {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            inbound_ports_excluded: vec![22, 15021],
            outbound_ports_excluded: vec![5432],
            outbound_cidrs_excluded: vec![
                "169.254.169.254/32".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn setup_makes_the_chains_then_redirects_all_but_what_is_left_alone() {
        let text = shell_lines("iptables", &setup_rules(&plan(), Family::V4));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "iptables -t nat -N NIP_INBOUND");
        assert!(lines
            .contains(&"iptables -t nat -A NIP_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(
            lines.contains(&"iptables -t nat -A NIP_REDIRECT -p tcp -j REDIRECT --to-ports 15001")
        );
        let position = |line: &str| lines.iter().position(|l| *l == line).unwrap_or(usize::MAX);
        // Exclusions come before the catch-all jump of their chain.
        let own = position("iptables -t nat -A NIP_OUTPUT -m owner --uid-owner 1337 -j RETURN");
        let metadata = position("iptables -t nat -A NIP_OUTPUT -d 169.254.169.254/32 -j RETURN");
        let database = position("iptables -t nat -A NIP_OUTPUT -p tcp --dport 5432 -j RETURN");
        let redirect = position("iptables -t nat -A NIP_OUTPUT -j NIP_REDIRECT");
        assert!(
            own < metadata && metadata < database && database < redirect,
            "{text}"
        );
        let ssh = position("iptables -t nat -A NIP_INBOUND -p tcp --dport 22 -j RETURN");
        let inbound = position("iptables -t nat -A NIP_INBOUND -p tcp -j NIP_IN_REDIRECT");
        assert!(ssh < inbound, "{text}");
        assert!(!text.contains("fd00::"), "IPv6 ranges are ip6tables'");
        let v6 = shell_lines("ip6tables", &setup_rules(&plan(), Family::V6));
        assert!(v6.contains("-A NIP_OUTPUT -d ::1/128 -j RETURN"), "{v6}");
        assert!(v6.contains("-A NIP_OUTPUT -d fd00::/8 -j RETURN"), "{v6}");
        assert!(!v6.contains("169.254"), "{v6}");
        assert_eq!(Family::V6.binary("iptables-nft"), "ip6tables-nft");
        assert_eq!(
            Family::V6.binary("/usr/sbin/iptables"),
            "/usr/sbin/ip6tables"
        );
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert!("10.0.0.0/33"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("0 to 32"));
        assert!("example.com/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn cleanup_removes_jumps_before_chains() {
        let text = shell_lines("iptables", &cleanup_rules());
        let jump = text.find("-D OUTPUT").unwrap();
        let delete = text.find("-X NIP_OUTPUT").unwrap();
        assert!(jump < delete);
    }
}
