//! Against a real veth + tap in a network namespace the test creates
//! (root required, as the shim itself).

use std::process::Command;

use super::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct TestNetns(String);

impl TestNetns {
    fn new() -> Self {
        let name = format!("husk-net-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        TestNetns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovers_the_cni_interface_and_mirrors_it_to_a_tap() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test as root"
        );
        eprintln!("skipped: not root");
        return;
    }
    let ns = TestNetns::new();
    // What a CNI bridge plugin leaves in a pod namespace.
    ns.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.exec(&[
        "ip",
        "link",
        "set",
        "eth0",
        "address",
        "02:42:0a:58:00:07",
        "mtu",
        "1450",
        "up",
    ]);
    ns.exec(&["ip", "link", "set", "peer0", "up"]);
    ns.exec(&["ip", "addr", "add", "10.88.0.7/16", "dev", "eth0"]);
    ns.exec(&["ip", "route", "add", "default", "via", "10.88.0.1"]);
    ns.exec(&["ip", "tuntap", "add", "husk_tap0", "mode", "tap"]);

    let net = discover(&ns.path()).await.unwrap();
    let names: Vec<_> = net.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert!(names.contains(&"eth0"), "{names:?}");
    let eth0 = net.interfaces.iter().find(|i| i.name == "eth0").unwrap();
    assert_eq!(eth0.mac, [0x02, 0x42, 0x0a, 0x58, 0x00, 0x07]);
    assert_eq!(eth0.mtu, 1450);
    assert_eq!(eth0.addresses, vec![("10.88.0.7".parse().unwrap(), 16)]);
    // The connected route is the guest kernel's own; only the default is passed.
    let v4: Vec<_> = net
        .routes
        .iter()
        .filter(|r| !r.gateway.contains(':'))
        .collect();
    assert_eq!(v4.len(), 1, "{:?}", net.routes);
    assert_eq!(
        (v4[0].dest.as_str(), v4[0].gateway.as_str()),
        ("", "10.88.0.1")
    );
    let guest = guest_interface(eth0);
    assert_eq!(guest.hw_addr, "02:42:0a:58:00:07");

    // Mirror only eth0 (peer0 is the other end of the test veth).
    let only_eth0 = PodNetwork {
        interfaces: vec![PodInterface {
            tap_name: "husk_tap0".into(),
            ..eth0.clone()
        }],
        ..net
    };
    connect(&only_eth0).await.unwrap();
    for dev in ["eth0", "husk_tap0"] {
        let filters = ns.exec(&["tc", "filter", "show", "dev", dev, "ingress"]);
        assert!(filters.contains("protocol all"), "{dev}: {filters}");
        assert!(
            filters.contains("mirred") && filters.contains("Redirect"),
            "{dev}: {filters}"
        );
    }
    let to_tap = ns.exec(&["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(to_tap.contains("husk_tap0"), "{to_tap}");
}

#[tokio::test]
async fn missing_netns_is_named() {
    let err = discover(Path::new("/var/run/netns/husk-no-such-ns"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("husk-no-such-ns"), "{err}");
}
