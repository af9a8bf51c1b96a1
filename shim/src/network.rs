//! Pod networking, tc-filter model (as Kata does): CNI put a veth (`eth0`)
//! with the pod's MAC, addresses and routes into the pod's network
//! namespace. The shim creates a tap next to it (the VMM's virtio-net
//! backend) and mirrors every frame arriving on one to the other with tc
//! (ingress qdisc + u32 match-all + mirred egress redirect); the guest NIC
//! gets eth0's MAC, MTU, addresses and routes from the agent. Works with any
//! CNI plugin, and nothing in the pod namespace's own IP stack is used.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use husk_protocol::agent::{Interface, IpAddress, Route};
use husk_util::netlink::{self, mac_string, route_ip, Link};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Errors reading or plumbing the pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot enter network namespace {path}: {message}")]
    Netns { path: PathBuf, message: String },
    #[error("netlink {what} in {netns}: {message}")]
    Netlink {
        what: String,
        netns: PathBuf,
        message: String,
    },
}

/// The main routing table.
const MAIN_TABLE: u8 = 254;
/// ETH_P_ALL, in network byte order as tc's protocol field wants it.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// tc handle of the ingress qdisc's parent ("ffff:").
const INGRESS_PARENT: u32 = 0xffff_0000;

/// One CNI interface of the pod and the tap mirrored to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// (address, prefix length)
    pub addresses: Vec<(IpAddr, u8)>,
    pub tap_name: String,
}

/// What the pod's network namespace holds, as the guest should see it.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interfaces: Vec<PodInterface>,
    pub routes: Vec<Route>,
}

/// Runs `f` on a short-lived thread that entered the network namespace of
/// `netns` (an open nsfs file): sockets keep the namespace they were created
/// in, so this process's own threads stay where they are.
pub(crate) fn on_thread_in<T: Send>(
    netns: &File,
    f: impl FnOnce() -> T + Send,
) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())?;
                Ok(f())
            })
            .join()
            .map_err(|_| "the namespace thread panicked".to_string())?
    })
}

/// A netlink handle whose socket lives in `netns` ([`on_thread_in`]).
fn handle_in(netns: &Path) -> Result<Handle, NetworkError> {
    let err = |message: String| NetworkError::Netns {
        path: netns.to_path_buf(),
        message,
    };
    let file = File::open(netns).map_err(|e| err(e.to_string()))?;
    let runtime = tokio::runtime::Handle::current();
    let (connection, handle, _) = on_thread_in(&file, || {
        // The socket registers with this runtime's reactor.
        let _entered = runtime.enter();
        rtnetlink::new_connection()
    })
    .map_err(err)?
    .map_err(|e| err(e.to_string()))?;
    tokio::spawn(connection);
    Ok(handle)
}

fn nl_err(what: impl Into<String>, netns: &Path) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    let netns = netns.to_path_buf();
    move |e| NetworkError::Netlink {
        what,
        netns,
        message: e.to_string(),
    }
}

/// Interfaces CNI made: ethernet links other than loopback and our taps.
fn is_pod_interface(link: &Link) -> bool {
    link.name != "lo"
        && !link.name.starts_with(TAP_PREFIX)
        && link.ethernet_mac().is_some_and(|m| m != [0; 6])
}

/// Our taps are `husk_tap<N>`.
const TAP_PREFIX: &str = "husk_tap";

async fn links(handle: &Handle, netns: &Path) -> Result<Vec<Link>, NetworkError> {
    netlink::links(handle)
        .await
        .map_err(|e| NetworkError::Netlink {
            what: "list links".into(),
            netns: netns.to_path_buf(),
            message: e.to_string(),
        })
}

/// A main-table route for the guest, unless the guest kernel makes it
/// itself (connected and link-local routes, protocol "kernel").
fn route_for_guest(msg: &RouteMessage, links: &[Link]) -> Option<Route> {
    if msg.header.table != MAIN_TABLE
        || msg.header.protocol == RouteProtocol::Kernel
        || msg.header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut route = Route::new();
    route.scope = u32::from(u8::from(msg.header.scope));
    let mut dest = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dest = route_ip(a),
            RouteAttribute::Gateway(a) => route.gateway = route_ip(a)?.to_string(),
            RouteAttribute::PrefSource(a) => route.source = route_ip(a)?.to_string(),
            RouteAttribute::Priority(metric) => route.metric = *metric,
            RouteAttribute::Oif(index) => {
                let link = links.iter().find(|l| l.index == *index)?;
                if !is_pod_interface(link) {
                    return None;
                }
                route.device = link.name.clone();
            }
            _ => {}
        }
    }
    if let Some(dest) = dest {
        route.dest = format!("{dest}/{}", msg.header.destination_prefix_length);
    }
    route.onlink = msg.header.flags.contains(RouteFlags::Onlink);
    Some(route)
}

/// Reads the pod's interfaces and routes in `netns`.
pub async fn discover(netns: &Path) -> Result<PodNetwork, NetworkError> {
    let handle = handle_in(netns)?;
    let all_links = links(&handle, netns).await?;
    let mut interfaces = Vec::new();
    for link in all_links.iter().filter(|l| is_pod_interface(l)) {
        let mut addresses = Vec::new();
        let msgs: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(format!("list addresses of {}", link.name), netns))?;
        for msg in msgs {
            let mut ip = None;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Local(a) => ip = Some(*a),
                    AddressAttribute::Address(a) if ip.is_none() => ip = Some(*a),
                    _ => {}
                }
            }
            // The guest makes its own IPv6 link-local address from the MAC.
            if let Some(ip) = ip.filter(|ip| !is_link_local(ip)) {
                addresses.push((ip, msg.header.prefix_len));
            }
        }
        interfaces.push(PodInterface {
            name: link.name.clone(),
            mac: link.ethernet_mac().unwrap_or_default(),
            mtu: link.mtu,
            addresses,
            tap_name: format!("{TAP_PREFIX}{}", interfaces.len()),
        });
    }
    // One dump at a time: the kernel answers EBUSY to a second dump
    // started on the same socket while the first is still running.
    let mut routes = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list routes", netns))?;
        routes.extend(msgs.iter().filter_map(|m| route_for_guest(m, &all_links)));
    }
    Ok(PodNetwork {
        netns: netns.to_path_buf(),
        interfaces,
        routes,
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Mirrors each pod interface and its tap (which the VMM created) both ways.
pub async fn connect(net: &PodNetwork) -> Result<(), NetworkError> {
    let handle = handle_in(&net.netns)?;
    let all = links(&handle, &net.netns).await?;
    let index = |name: &str| {
        all.iter()
            .find(|l| l.name == name)
            .map(|l| l.index)
            .ok_or_else(|| NetworkError::Netlink {
                what: format!("find {name}"),
                netns: net.netns.clone(),
                message: "no such interface".into(),
            })
    };
    for iface in &net.interfaces {
        let (veth, tap) = (index(&iface.name)?, index(&iface.tap_name)?);
        for (from, to) in [(veth, tap), (tap, veth)] {
            // rtnetlink takes tc's interface index signed.
            let from_index = i32::try_from(from).map_err(|_| NetworkError::Netlink {
                what: format!("link index {from}"),
                netns: net.netns.clone(),
                message: "out of range".into(),
            })?;
            handle
                .qdisc()
                .add(from_index)
                .ingress()
                .execute()
                .await
                .map_err(nl_err(
                    format!("add ingress qdisc on link {from}"),
                    &net.netns,
                ))?;
            handle
                .traffic_filter(from_index)
                .add()
                .parent(INGRESS_PARENT)
                .protocol(ETH_P_ALL_BE)
                .redirect(to)
                .map_err(nl_err("build redirect filter", &net.netns))?
                .execute()
                .await
                .map_err(nl_err(format!("redirect link {from} to {to}"), &net.netns))?;
        }
        tracing::info!(netns = %net.netns.display(), "{} <-> {} mirrored", iface.name, iface.tap_name);
    }
    Ok(())
}

/// The guest interface the agent should configure for `iface`.
pub fn guest_interface(iface: &PodInterface) -> Interface {
    let mut out = Interface::new();
    out.name = iface.name.clone();
    out.hw_addr = mac_string(&iface.mac);
    out.mtu = iface.mtu;
    out.up = true;
    for (ip, prefix) in &iface.addresses {
        let mut a = IpAddress::new();
        a.address = ip.to_string();
        a.prefix_len = u32::from(*prefix);
        out.addresses.push(a);
    }
    out
}

#[cfg(test)]
mod tests;
