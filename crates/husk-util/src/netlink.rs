//! Network links over rtnetlink, as the shim (in a pod's network namespace)
//! and the agent (in the guest) both read and change them: list them, find
//! one by name, index or MAC, bring it up or down, rename it, set its MTU
//! or MAC; and the address and MAC helpers around that.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteAddress;
use rtnetlink::{Handle, LinkUnspec};

/// A failed netlink request, naming what it was for.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request or the reply did not parse.
    #[error("netlink: {what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// No link matched a lookup.
    #[error("no network interface with {0}")]
    NoSuchLink(String),
}

impl NetlinkError {
    /// Wraps an rtnetlink error with what the request was for.
    pub fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let what = what.into();
        move |source| NetlinkError::Request { what, source }
    }

    /// The kernel's errno, for a request the kernel refused.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => Some(-e.raw_code()),
            NetlinkError::Socket(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// A netlink connection for this thread's network namespace. Its
/// connection task runs on the current tokio runtime and ends when the
/// handle (and its clones) are dropped.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// One network link as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address (empty when the link has none).
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
}

impl Link {
    /// The link a `RTM_NEWLINK` message describes.
    pub fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(a) => link.mac.clone_from(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                _ => {}
            }
        }
        link
    }

    /// The MAC of an ethernet link (six bytes), if it has one.
    pub fn ethernet_mac(&self) -> Option<[u8; 6]> {
        <[u8; 6]>::try_from(self.mac.as_slice()).ok()
    }
}

/// Every link of the handle's namespace.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, NetlinkError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request("list links"))?;
    Ok(msgs.iter().map(Link::from_message).collect())
}

/// How to find one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKey<'a> {
    Name(&'a str),
    Index(u32),
    Mac(&'a [u8]),
}

impl std::fmt::Display for LinkKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkKey::Name(name) => write!(f, "name {name:?}"),
            LinkKey::Index(index) => write!(f, "index {index}"),
            LinkKey::Mac(mac) => write!(f, "MAC {}", mac_string(mac)),
        }
    }
}

impl LinkKey<'_> {
    /// Whether `link` is the one this key names.
    pub fn matches(&self, link: &Link) -> bool {
        match self {
            LinkKey::Name(name) => link.name == *name,
            LinkKey::Index(index) => link.index == *index,
            LinkKey::Mac(mac) => link.mac == *mac,
        }
    }
}

/// Finds one link in a list from [`links`].
pub fn find<'l>(links: &'l [Link], key: LinkKey<'_>) -> Result<&'l Link, NetlinkError> {
    links
        .iter()
        .find(|l| key.matches(l))
        .ok_or_else(|| NetlinkError::NoSuchLink(key.to_string()))
}

/// Looks one link up in the handle's namespace.
pub async fn link(handle: &Handle, key: LinkKey<'_>) -> Result<Link, NetlinkError> {
    find(&links(handle).await?, key).cloned()
}

/// What to change on a link, all in one request (unset fields stay).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChange {
    /// Bring the link up (`Some(true)`) or down (`Some(false)`).
    pub up: Option<bool>,
    pub name: Option<String>,
    pub mtu: Option<u32>,
    pub mac: Option<Vec<u8>>,
}

/// Applies `change` to the link with `index`; `what` names the link in an
/// error.
pub async fn set_link(
    handle: &Handle,
    index: u32,
    change: LinkChange,
    what: &str,
) -> Result<(), NetlinkError> {
    let mut msg = LinkUnspec::new_with_index(index);
    match change.up {
        Some(true) => msg = msg.up(),
        Some(false) => msg = msg.down(),
        None => {}
    }
    if let Some(name) = change.name {
        msg = msg.name(name);
    }
    if let Some(mtu) = change.mtu {
        msg = msg.mtu(mtu);
    }
    if let Some(mac) = change.mac {
        msg = msg.address(mac);
    }
    handle
        .link()
        .set(msg.build())
        .execute()
        .await
        .map_err(NetlinkError::request(format!("configure {what}")))
}

/// Brings the link with `index` up; `what` names it in an error.
pub async fn set_up(handle: &Handle, index: u32, what: &str) -> Result<(), NetlinkError> {
    let change = LinkChange {
        up: Some(true),
        ..LinkChange::default()
    };
    set_link(handle, index, change, what).await
}

/// The address messages of the link with `index`.
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>, NetlinkError> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request(format!(
            "list addresses of link {index}"
        )))
}

/// The interface's own address in an address message: `IFA_LOCAL` where
/// present (for IPv4 `IFA_ADDRESS` is the peer's on point-to-point links),
/// else `IFA_ADDRESS`.
pub fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// An IP address of a route attribute (destination, gateway, source).
pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// "aa:bb:cc:dd:ee:ff".
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// "aa:bb:cc:dd:ee:ff" → bytes; `None` unless six two-digit hex bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect();
    <[u8; 6]>::try_from(bytes?.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let mac = parse_mac("02:00:0a:58:00:2A").unwrap();
        assert_eq!(mac, [2, 0, 10, 0x58, 0, 0x2a]);
        assert_eq!(mac_string(&mac), "02:00:0a:58:00:2a");
        for bad in [
            "",
            "02:00:0a:58:00",
            "02:00:0a:58:00:2a:ff",
            "2:00:0a:58:00:2a",
            "zz:00:0a:58:00:2a",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_find_links() {
        let all = vec![
            Link {
                index: 1,
                name: "lo".into(),
                mac: vec![0; 6],
                mtu: 65536,
                up: true,
            },
            Link {
                index: 2,
                name: "eth0".into(),
                mac: vec![2, 0, 0, 0, 0, 1],
                mtu: 1500,
                up: false,
            },
        ];
        assert_eq!(find(&all, LinkKey::Name("eth0")).unwrap().index, 2);
        assert_eq!(find(&all, LinkKey::Index(1)).unwrap().name, "lo");
        assert_eq!(
            find(&all, LinkKey::Mac(&[2, 0, 0, 0, 0, 1])).unwrap().name,
            "eth0"
        );
        let e = find(&all, LinkKey::Name("eth1")).unwrap_err().to_string();
        assert!(e.contains("\"eth1\""), "{e}");
        assert_eq!(all[1].ethernet_mac(), Some([2, 0, 0, 0, 0, 1]));
    }

    /// Listing links needs no privilege: this namespace has a loopback.
    #[tokio::test]
    async fn finds_loopback() {
        let handle = connect().unwrap();
        let lo = link(&handle, LinkKey::Name("lo")).await.unwrap();
        assert!(lo.index > 0);
        assert_eq!(link(&handle, LinkKey::Index(lo.index)).await.unwrap(), lo);
    }
}
