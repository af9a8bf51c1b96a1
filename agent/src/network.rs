//! The guest's network, over rtnetlink: interfaces (name, MAC, MTU, IP
//! addresses, up/down) and the main routing table. Kata's agent is the
//! model: the host tells the guest NIC the MAC/IP/routes that CNI gave the
//! pod's interface on the host.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use husk_protocol::agent::{Interface, IpAddress, Route};
use husk_util::netlink::{
    self as nl, address_of, links, mac_string, route_ip, Link, LinkChange, LinkKey, NetlinkError,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::error::{Error, Result};

const MAIN_TABLE: u8 = 254;

fn nl_error(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

impl From<NetlinkError> for Error {
    fn from(e: NetlinkError) -> Error {
        match e {
            NetlinkError::NoSuchLink(_) => Error::NotFound(e.to_string()),
            other => Error::Internal(other.to_string()),
        }
    }
}

/// A netlink connection for one request (its task ends with the handle).
fn connect() -> Result<Handle> {
    Ok(nl::connect()?)
}

/// "aa:bb:cc:dd:ee:ff" → bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    nl::parse_mac(text).ok_or_else(|| Error::InvalidArgument(format!("bad MAC address {text:?}")))
}

fn parse_ip(text: &str, what: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| Error::InvalidArgument(format!("bad {what} {text:?}")))
}

async fn interface(handle: &Handle, link: &Link) -> Result<Interface> {
    let mut out = Interface::new();
    out.name = link.name.clone();
    out.hw_addr = mac_string(&link.mac);
    out.mtu = link.mtu;
    out.up = link.up;
    for msg in nl::addresses(handle, link.index).await? {
        if let Some(ip) = address_of(&msg) {
            let mut a = IpAddress::new();
            a.address = ip.to_string();
            a.prefix_len = u32::from(msg.header.prefix_len);
            out.addresses.push(a);
        }
    }
    Ok(out)
}

pub async fn list_interfaces() -> Result<Vec<Interface>> {
    let handle = connect()?;
    let mut out = Vec::new();
    for link in links(&handle).await? {
        out.push(interface(&handle, &link).await?);
    }
    Ok(out)
}

/// Brings `lo` up.
pub async fn loopback_up() -> Result<()> {
    let handle = connect()?;
    let lo = nl::link(&handle, LinkKey::Name("lo"))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(nl::set_up(&handle, lo.index, "lo").await?)
}

pub async fn update_interface(want: &Interface) -> Result<Interface> {
    let mac = (!want.hw_addr.is_empty())
        .then(|| parse_mac(&want.hw_addr))
        .transpose()?;
    let mut new_addresses = Vec::new();
    for a in &want.addresses {
        let ip = parse_ip(&a.address, "IP address")?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = u8::try_from(a.prefix_len)
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("bad prefix length {} for {ip}", a.prefix_len))
            })?;
        new_addresses.push((ip, prefix));
    }
    let previous = (!want.previous_hw_addr.is_empty())
        .then(|| parse_mac(&want.previous_hw_addr))
        .transpose()?;
    let handle = connect()?;
    let key = match (&previous, &mac) {
        (Some(previous), _) => LinkKey::Mac(previous),
        (None, Some(mac)) => LinkKey::Mac(mac),
        (None, None) => LinkKey::Name(&want.name),
    };
    let link = nl::link(&handle, key).await?;
    let what = format!("interface {}", link.name);

    // Down first: a rename needs it, and addresses go on before it is up.
    let change = LinkChange {
        up: Some(false),
        name: (!want.name.is_empty() && want.name != link.name).then(|| want.name.clone()),
        mtu: (want.mtu != 0).then_some(want.mtu),
        mac: mac.map(|m| m.to_vec()).filter(|m| *m != link.mac),
    };
    nl::set_link(&handle, link.index, change, &what).await?;
    for old in nl::addresses(&handle, link.index).await? {
        handle
            .address()
            .del(old)
            .execute()
            .await
            .map_err(nl_error(format!("remove an address of {what}")))?;
    }
    for (ip, prefix) in new_addresses {
        handle
            .address()
            .add(link.index, ip, prefix)
            .execute()
            .await
            .map_err(nl_error(format!("add {ip}/{prefix} to {what}")))?;
    }
    if want.up {
        nl::set_up(&handle, link.index, &what).await?;
    }
    let now = nl::link(&handle, LinkKey::Index(link.index))
        .await
        .map_err(|e| Error::Internal(format!("{what}: {e}")))?;
    interface(&handle, &now).await
}

async fn route_messages(handle: &Handle) -> Result<Vec<RouteMessage>> {
    let mut all: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl_error("list IPv4 routes"))?;
    let v6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl_error("list IPv6 routes"))?;
    all.extend(v6);
    Ok(all
        .into_iter()
        .filter(|m| m.header.table == MAIN_TABLE)
        .collect())
}

fn route_of(msg: &RouteMessage, names: &[(u32, String)]) -> Route {
    let mut route = Route::new();
    route.scope = u32::from(u8::from(msg.header.scope));
    let mut dest = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dest = route_ip(a),
            RouteAttribute::Gateway(a) => {
                route.gateway = route_ip(a).map(|i| i.to_string()).unwrap_or_default()
            }
            RouteAttribute::PrefSource(a) => {
                route.source = route_ip(a).map(|i| i.to_string()).unwrap_or_default()
            }
            RouteAttribute::Oif(i) => {
                route.device = names
                    .iter()
                    .find(|(idx, _)| idx == i)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default()
            }
            _ => {}
        }
    }
    if let Some(dest) = dest {
        route.dest = format!("{dest}/{}", msg.header.destination_prefix_length);
    }
    route
}

pub async fn list_routes() -> Result<Vec<Route>> {
    let handle = connect()?;
    let names: Vec<(u32, String)> = links(&handle)
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    Ok(route_messages(&handle)
        .await?
        .iter()
        .map(|m| route_of(m, &names))
        .collect())
}

fn build_route(route: &Route, links: &[Link]) -> Result<RouteMessage> {
    let gateway = (!route.gateway.is_empty())
        .then(|| parse_ip(&route.gateway, "gateway"))
        .transpose()?;
    let (dest, prefix) = if route.dest.is_empty() || route.dest == "default" {
        let any = match gateway {
            Some(IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        };
        (any, 0)
    } else {
        let (ip, len) = route.dest.split_once('/').unwrap_or((&route.dest, ""));
        let ip = parse_ip(ip, "route destination")?;
        let len = if len.is_empty() {
            if ip.is_ipv4() {
                32
            } else {
                128
            }
        } else {
            len.parse().map_err(|_| {
                Error::InvalidArgument(format!("bad route destination {:?}", route.dest))
            })?
        };
        (ip, len)
    };
    // rtnetlink does not export its error type for these: format in place.
    let invalid = |e: String| Error::InvalidArgument(format!("route to {:?}: {e}", route.dest));
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, prefix)
        .map_err(|e| invalid(e.to_string()))?
        .scope(RouteScope::from(u8::try_from(route.scope).map_err(
            |_| Error::InvalidArgument(format!("bad route scope {}", route.scope)),
        )?));
    if let Some(gw) = gateway {
        b = b.gateway(gw).map_err(|e| invalid(e.to_string()))?;
    }
    if !route.source.is_empty() {
        b = b
            .pref_source(parse_ip(&route.source, "route source")?)
            .map_err(|e| invalid(e.to_string()))?;
    }
    if !route.device.is_empty() {
        let link = links
            .iter()
            .find(|l| l.name == route.device)
            .ok_or_else(|| Error::NotFound(format!("route device {:?} not found", route.device)))?;
        b = b.output_interface(link.index);
    }
    if route.metric != 0 {
        b = b.priority(route.metric);
    }
    if route.onlink {
        b = b.onlink();
    }
    Ok(b.build())
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(e) if e.raw_code() == -libc::EEXIST)
}

/// Adds a route: exclusively, or appended beside routes of the same
/// destination and metric (`ip route append`; the same route twice stays
/// an error).
async fn add_route(
    handle: &Handle,
    msg: RouteMessage,
    append: bool,
) -> Result<(), rtnetlink::Error> {
    use futures_util::StreamExt;
    use rtnetlink::packet_core::{
        NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL,
        NLM_F_REQUEST,
    };
    use rtnetlink::packet_route::RouteNetlinkMessage;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewRoute(msg));
    let how = if append { NLM_F_APPEND } else { NLM_F_EXCL };
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | how;
    let mut response = handle.clone().request(req)?;
    while let Some(message) = response.next().await {
        if let NetlinkPayload::Error(err) = message.payload {
            return Err(rtnetlink::Error::NetlinkError(err));
        }
    }
    Ok(())
}

/// The order to add routes in: those without a gateway first, so that a
/// gateway route finds its connected route already there.
fn add_order(routes: &[Route]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..routes.len()).collect();
    order.sort_by_key(|&i| !routes[i].gateway.is_empty());
    order
}

pub async fn update_routes(routes: &[Route]) -> Result<Vec<Route>> {
    let handle = connect()?;
    let links = links(&handle).await?;
    let wanted = routes
        .iter()
        .map(|r| build_route(r, &links))
        .collect::<Result<Vec<_>>>()?;
    for old in route_messages(&handle).await? {
        if old.header.protocol == RouteProtocol::Kernel {
            // The kernel's own (connected subnets, IPv6 link-local) stay.
            continue;
        }
        handle
            .route()
            .del(old)
            .execute()
            .await
            .map_err(nl_error("remove a route"))?;
    }
    let mut wanted: Vec<Option<RouteMessage>> = wanted.into_iter().map(Some).collect();
    for i in add_order(routes) {
        let (Some(msg), route) = (wanted[i].take(), &routes[i]) else {
            continue;
        };
        let added = match add_route(&handle, msg.clone(), false).await {
            // A route to the same destination and metric exists: typically
            // the subnet's connected route the kernel made with the address,
            // which CNI's own route to the subnet via the gateway sits
            // beside in the pod's netns. Appended, both are there as in the
            // pod; the very same route again is not an error either.
            Err(e) if is_exists(&e) => match add_route(&handle, msg, true).await {
                Err(e) if is_exists(&e) => Ok(()),
                other => other,
            },
            other => other,
        };
        added.map_err(nl_error(format!("add route to {:?}", route.dest)))?;
    }
    list_routes().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let mac = parse_mac("02:42:ac:11:00:02").unwrap();
        assert_eq!(mac, [2, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(mac_string(&mac), "02:42:ac:11:00:02");
        for bad in [
            "",
            "02:42",
            "02:42:ac:11:00:zz",
            "2:42:ac:11:00:02",
            "02:42:ac:11:00:02:03",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connected_routes_go_before_gateway_routes() {
        let route = |dest: &str, gw: &str| {
            let mut r = Route::new();
            r.dest = dest.into();
            r.gateway = gw.into();
            r
        };
        let routes = [
            route("", "10.0.0.1"),
            route("10.0.0.0/24", ""),
            route("10.1.0.0/16", "10.0.0.1"),
            route("169.254.1.1/32", ""),
        ];
        assert_eq!(add_order(&routes), [1, 3, 0, 2]);
    }

    #[test]
    fn metric_and_onlink_are_carried() {
        let mut r = Route::new();
        r.dest = "10.0.0.0/24".into();
        r.gateway = "169.254.1.1".into();
        r.metric = 100;
        r.onlink = true;
        let msg = build_route(&r, &[]).unwrap();
        assert!(msg.attributes.contains(&RouteAttribute::Priority(100)));
        assert!(msg
            .header
            .flags
            .contains(rtnetlink::packet_route::route::RouteFlags::Onlink));
    }

    #[test]
    fn routes_need_valid_addresses() {
        let mut r = Route::new();
        r.dest = "10.0.0.0/99".into();
        assert!(build_route(&r, &[]).is_err());
        r.dest = "10.0.0.0/24".into();
        r.device = "nope0".into();
        assert!(matches!(build_route(&r, &[]), Err(Error::NotFound(_))));
        r.device.clear();
        r.gateway = "not-an-ip".into();
        assert!(matches!(
            build_route(&r, &[]),
            Err(Error::InvalidArgument(_))
        ));
        r.gateway = "10.0.0.1".into();
        assert!(build_route(&r, &[]).is_ok());
    }
}
