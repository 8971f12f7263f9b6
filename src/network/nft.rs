//! berth's nftables table (`inet berth`): MASQUERADE for pod egress and DNAT
//! for host ports.
//!
//! The table is always rewritten whole from the network records, in one nft
//! transaction (add + delete + add the table, then its chains and rules): it
//! is a pure function of what is recorded on disk, so a crash between any two
//! steps is repaired by the next rewrite, and no rule handle has to be
//! remembered to remove a pod's rules.

use super::{NetworkError, PortMapping, Protocol};
use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix, CT,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{JumpTarget, Match, NATFamily, Operator, Statement, NAT};
use nftables::types::{NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::net::IpAddr;

pub const TABLE: &str = "berth";
const HOSTPORTS: &str = "hostports";

/// One pod's host-port rules.
pub struct PodPorts<'a> {
    pub ips: &'a [IpAddr],
    pub ports: &'a [PortMapping],
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn matches<'a>(left: Expression<'a>, op: Operator, right: Expression<'a>) -> Statement<'a> {
    Statement::Match(Match { left, right, op })
}

fn prefix(net: &IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(net.network().to_string().into())),
        len: net.prefix_len() as u32,
    }))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn s(v: impl ToString) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}

fn family_of(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

fn local_daddr() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: [FibFlag::Daddr].into(),
        })),
        Operator::EQ,
        s("local"),
    )
}

/// The full table for a bridge, its subnets and the pods' host ports.
pub fn ruleset<'a>(
    bridge: &'a str,
    subnets: &'a [IpNet],
    pods: &[PodPorts<'_>],
) -> nftables::schema::Nftables<'a> {
    let fam = NfFamily::INet;
    let mut b = Batch::new();
    let table = Table {
        family: fam,
        name: TABLE.into(),
        handle: None,
    };
    b.add(NfListObject::Table(table.clone()));
    b.delete(NfListObject::Table(table.clone()));
    b.add(NfListObject::Table(table));
    let chain = |name: &'static str, hook: Option<(NfHook, i32)>| Chain {
        family: fam,
        table: TABLE.into(),
        name: name.into(),
        _type: hook.map(|_| NfChainType::NAT),
        hook: hook.map(|h| h.0),
        prio: hook.map(|h| h.1),
        ..Chain::default()
    };
    // dstnat (-100) and srcnat (100) priorities.
    b.add(NfListObject::Chain(chain(
        "prerouting",
        Some((NfHook::Prerouting, -100)),
    )));
    b.add(NfListObject::Chain(chain(
        "output",
        Some((NfHook::Output, -100)),
    )));
    b.add(NfListObject::Chain(chain(
        "postrouting",
        Some((NfHook::Postrouting, 100)),
    )));
    b.add(NfListObject::Chain(chain(HOSTPORTS, None)));
    let rule = |chain: &'static str, expr: Vec<Statement<'a>>| {
        NfListObject::Rule(Rule {
            family: fam,
            table: TABLE.into(),
            chain: chain.into(),
            expr: expr.into(),
            ..Rule::default()
        })
    };
    // Host ports answer on every local address, for packets from outside
    // (prerouting) and from the host itself (output).
    for c in ["prerouting", "output"] {
        b.add(rule(
            c,
            vec![
                local_daddr(),
                Statement::Jump(JumpTarget {
                    target: HOSTPORTS.into(),
                }),
            ],
        ));
    }
    for net in subnets {
        let f = if net.addr().is_ipv4() { "ip" } else { "ip6" };
        // Egress: pod traffic leaving the pod subnet takes the host's address.
        b.add(rule(
            "postrouting",
            vec![
                matches(payload(f, "saddr"), Operator::EQ, prefix(net)),
                matches(payload(f, "daddr"), Operator::NEQ, prefix(net)),
                Statement::Masquerade(None),
            ],
        ));
        // Hairpin: a pod reaching a host port that leads back into the
        // subnet must see replies come from the host, not from the peer pod.
        b.add(rule(
            "postrouting",
            vec![
                matches(meta(MetaKey::Oifname), Operator::EQ, s(bridge)),
                matches(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "status".into(),
                        family: None,
                        dir: None,
                    })),
                    Operator::IN,
                    s("dnat"),
                ),
                matches(payload(f, "saddr"), Operator::EQ, prefix(net)),
                Statement::Masquerade(None),
            ],
        ));
    }
    // Host ports used from the host through 127.0.0.1 (route_localnet is on
    // for the bridge): the pod cannot answer a loopback source.
    b.add(rule(
        "postrouting",
        vec![
            matches(meta(MetaKey::Oifname), Operator::EQ, s(bridge)),
            matches(
                payload("ip", "saddr"),
                Operator::EQ,
                prefix(&"127.0.0.0/8".parse().expect("static prefix")),
            ),
            Statement::Masquerade(None),
        ],
    ));
    for pod in pods {
        for pm in pod.ports {
            for ip in pod.ips {
                if pm.host_ip.is_some_and(|h| h.is_ipv4() != ip.is_ipv4()) {
                    continue;
                }
                let f = family_of(ip);
                let mut expr = vec![matches(
                    meta(MetaKey::Nfproto),
                    Operator::EQ,
                    s(if ip.is_ipv4() { "ipv4" } else { "ipv6" }),
                )];
                if let Some(h) = pm.host_ip {
                    expr.push(matches(payload(f, "daddr"), Operator::EQ, s(h)));
                }
                expr.push(matches(
                    meta(MetaKey::L4proto),
                    Operator::EQ,
                    s(pm.protocol.nft_name()),
                ));
                expr.push(matches(
                    payload("th", "dport"),
                    Operator::EQ,
                    Expression::Number(pm.host_port as u32),
                ));
                expr.push(Statement::DNAT(Some(NAT {
                    addr: Some(s(ip)),
                    family: Some(if ip.is_ipv4() {
                        NATFamily::IP
                    } else {
                        NATFamily::IP6
                    }),
                    port: Some(Expression::Number(pm.container_port as u32)),
                    flags: None,
                })));
                b.add(rule(HOSTPORTS, expr));
            }
        }
    }
    b.to_nftables()
}

impl Protocol {
    fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

fn nft_error(e: nftables::helper::NftablesError) -> NetworkError {
    let message = match e {
        nftables::helper::NftablesError::NftFailed { stderr, hint, .. } => {
            format!("{hint}: {}", stderr.trim())
        }
        e => e.to_string(),
    };
    NetworkError::Nftables(message)
}

/// Replaces berth's table with `set` in one transaction.
pub fn apply(set: &nftables::schema::Nftables<'_>) -> Result<(), NetworkError> {
    nftables::helper::apply_ruleset(set).map_err(nft_error)
}

/// Deletes berth's table; an absent table is fine.
pub fn delete_table() -> Result<(), NetworkError> {
    let mut b = Batch::new();
    let table = Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    };
    b.add(NfListObject::Table(table.clone()));
    b.delete(NfListObject::Table(table));
    apply(&b.to_nftables())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_has_masquerade_and_dnat_per_family() {
        let subnets: Vec<IpNet> = vec!["10.88.0.0/16".parse().unwrap()];
        let ips: Vec<IpAddr> = vec!["10.88.0.2".parse().unwrap()];
        let ports = vec![PortMapping {
            protocol: Protocol::Udp,
            container_port: 53,
            host_port: 5353,
            host_ip: None,
        }];
        let set = ruleset(
            "berth0",
            &subnets,
            &[PodPorts {
                ips: &ips,
                ports: &ports,
            }],
        );
        let json = serde_json::to_string(&set).unwrap();
        assert!(json.contains(r#""masquerade":null"#), "{json}");
        assert!(
            json.contains(r#""dnat":{"addr":"10.88.0.2","family":"ip","port":53}"#),
            "{json}"
        );
        assert!(json.contains(r#""right":5353"#), "{json}");
    }
}
