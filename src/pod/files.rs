//! The per-pod /etc/hostname, /etc/hosts and /etc/resolv.conf, written once
//! and bind-mounted into each container of the pod.

use super::DnsConfig;
use std::fmt::Write;

pub fn hostname(h: &str) -> String {
    format!("{h}\n")
}

pub fn hosts(hostname: &str, ips: &[String]) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    for ip in ips {
        let _ = writeln!(s, "{ip}\t{hostname}");
    }
    s
}

/// From the pod's DNS config; without one, the host's resolv.conf.
pub fn resolv_conf(dns: Option<&DnsConfig>, host_resolv: &str) -> String {
    let Some(d) = dns else {
        return host_resolv.to_string();
    };
    let mut s = String::new();
    for server in &d.servers {
        let _ = writeln!(s, "nameserver {server}");
    }
    if !d.searches.is_empty() {
        let _ = writeln!(s, "search {}", d.searches.join(" "));
    }
    if !d.options.is_empty() {
        let _ = writeln!(s, "options {}", d.options.join(" "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_from_dns_config() {
        let d = DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&d), "nameserver 1.1.1.1\n"),
            "nameserver 10.0.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        assert_eq!(
            resolv_conf(None, "nameserver 1.1.1.1\n"),
            "nameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn hosts_lists_pod_ips() {
        let h = hosts("web-0", &["10.88.0.5".into()]);
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.88.0.5\tweb-0\n"));
    }
}
