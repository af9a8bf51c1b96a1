//! Small pieces that more than one of husk's programs need and that fit in
//! no protocol or config crate: [`sync::lock`], the [`guest::GuestWatch`]
//! interface between a VM and whoever waits for its guest, and (feature
//! `netlink`) the rtnetlink [`netlink::Link`] helpers of the shim and the
//! agent.

pub mod guest;
#[cfg(feature = "netlink")]
pub mod netlink;
pub mod sync;
