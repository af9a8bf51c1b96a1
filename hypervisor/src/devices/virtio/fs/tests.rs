//! Device tests: the test plays the Linux virtio-fs driver (rings in guest
//! memory, real FUSE requests) against a real shared directory, with the
//! device behind the virtio-mmio transport and its real worker thread.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::*;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::FsOptions;
use super::*;
use crate::bus::BusDevice;
use crate::devices::virtio::mmio::*;
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::test_utils::{
    activate, bring_up, kick, mem, raw, transport, TestQueue,
};

const QSIZE: u16 = 256;
const MEM_SIZE: usize = 0x400_0000;
/// Request slots: the request at +0, the reply buffer at +REPLY.
const SLOT_BASE: u64 = 0x20_0000;
const SLOT_SIZE: u64 = 0x4_0000;
const SLOTS: u64 = 64;
const REPLY: u64 = 0x2_0000;
const WAIT: Duration = Duration::from_secs(5);
const NEXT: u16 = tu::DESC_F_NEXT;
const WRITE: u16 = tu::DESC_F_WRITE;

/// A directory for one test, removed when the test ends.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn test_dir(name: &str) -> TestDir {
    let dir = std::env::temp_dir().join(format!("husk-fs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TestDir(dir)
}

fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

fn obj<T: ByteValued>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>(), "reply too short");
    *T::from_slice(&bytes[..std::mem::size_of::<T>()]).unwrap()
}

/// What came back for one chain.
#[derive(Debug)]
struct Reply {
    used_len: u32,
    hdr: Option<OutHeader>,
    data: Vec<u8>,
}

impl Reply {
    fn errno(&self) -> i32 {
        -self.hdr.expect("no reply header").error
    }

    fn ok(&self) -> &[u8] {
        let hdr = self.hdr.expect("no reply header");
        assert_eq!(hdr.error, 0, "request failed: errno {}", -hdr.error);
        &self.data
    }
}

/// The device, behind the MMIO transport or activated directly (to inspect it).
enum Dev {
    Mmio(MmioTransport),
    Direct(Fs),
}

/// The simulated guest driver.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Dev,
    queues: [TestQueue<'a>; 2],
    notify: Vec<EventFd>,
    next_desc: [u16; 2],
    seen: [u16; 2],
    next_slot: u64,
    unique: u64,
    /// Block on the device's interrupt for replies instead of polling the
    /// ring every millisecond (measurements).
    irq: Option<EventFd>,
    /// The interrupt eventfd of a directly activated device.
    irqfd: Option<EventFd>,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap, fs: Fs) -> Self {
        let mut g = Self::unstarted(mem, Dev::Mmio(transport(mem, Box::new(fs))));
        g.bring_up();
        g
    }

    /// Activates the device without the transport, as a driver with
    /// VERSION_1 and the test's rings would have it.
    fn direct(mem: &'a GuestMemoryMmap, mut fs: Fs) -> Self {
        let queues = TestQueue::at_strides(mem, QSIZE);
        let (notify, irqfd) = activate(&mut fs, mem, VIRTIO_F_VERSION_1, &[&queues[0], &queues[1]]);
        let mut g = Self::unstarted(mem, Dev::Direct(fs));
        g.queues = queues;
        g.notify = notify;
        g.irqfd = Some(irqfd);
        g
    }

    fn unstarted(mem: &'a GuestMemoryMmap, dev: Dev) -> Self {
        Guest {
            mem,
            dev,
            queues: TestQueue::at_strides(mem, QSIZE),
            notify: Vec::new(),
            next_desc: [0; 2],
            seen: [0; 2],
            next_slot: 0,
            unique: 0,
            irq: None,
            irqfd: None,
        }
    }

    fn fs(&mut self) -> &mut Fs {
        match &mut self.dev {
            Dev::Direct(fs) => fs,
            Dev::Mmio(_) => panic!("device is behind the transport"),
        }
    }

    fn transport(&mut self) -> &mut MmioTransport {
        match &mut self.dev {
            Dev::Mmio(t) => t,
            Dev::Direct(_) => panic!("device activated directly"),
        }
    }

    /// Brings the device up through its registers, as the Linux driver does,
    /// with VIRTIO_F_VERSION_1 and VIRTIO_RING_F_INDIRECT_DESC, on fresh rings.
    fn bring_up(&mut self) {
        let queues = TestQueue::at_strides(self.mem, QSIZE);
        let features = VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        self.notify = bring_up(self.transport(), features, &[&queues[0], &queues[1]]);
        self.queues = queues;
        self.next_desc = [0; 2];
        self.seen = [0; 2];
    }

    /// Resets the device through the status register and starts it again
    /// with fresh rings, as a rebooted guest would.
    fn restart(&mut self) {
        self.transport().write(0x70, &0u32.to_le_bytes());
        self.bring_up();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used_idx()
    }

    /// (id, len) of used ring entry `i`.
    fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        self.queues[q].used_elem(i)
    }

    fn table(&self, q: usize, i: u16, d: RawDescriptor) {
        self.queues[q].desc_table().store(i, d).unwrap();
    }

    /// Takes `n` consecutive descriptor indexes of queue `q`.
    fn descs(&mut self, q: usize, n: u16) -> u16 {
        if self.next_desc[q] + n > QSIZE {
            self.next_desc[q] = 0;
        }
        let d = self.next_desc[q];
        self.next_desc[q] += n;
        d
    }

    fn slot(&mut self) -> u64 {
        let s = SLOT_BASE + (self.next_slot % SLOTS) * SLOT_SIZE;
        self.next_slot += 1;
        s
    }

    /// Makes `head` available on queue `q`, kicks, and waits until the device
    /// returns it. Returns the used length.
    fn submit(&mut self, q: usize, head: u16) -> u32 {
        self.queues[q].push_avail(head);
        kick(&self.notify, q);
        let end = Instant::now() + WAIT;
        while self.used_idx(q) == self.seen[q] {
            assert!(Instant::now() < end, "chain {head} not returned");
            match &self.irq {
                Some(irq) => {
                    let mut pfd = libc::pollfd {
                        fd: irq.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    let _ = irq.read();
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let (id, len) = self.used_elem(q, self.seen[q]);
        self.seen[q] = self.seen[q].wrapping_add(1);
        assert_eq!(id, u32::from(head), "device returned another chain");
        len
    }

    /// Writes a request (header + body) into a slot; returns the slot.
    fn write_request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (u64, u64) {
        self.unique += 1;
        let hdr = InHeader {
            len: tu::small(std::mem::size_of::<InHeader>() + body.len()),
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let slot = self.slot();
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(slot)).unwrap();
        // Garbage in the reply buffer: nothing may be read back that the device did not write.
        self.mem
            .write_slice(&[0xa5; 64], GuestAddress(slot + REPLY))
            .unwrap();
        (slot, req.len() as u64)
    }

    fn read_reply(&self, slot: u64, used_len: u32) -> Reply {
        let hdr = (used_len as usize >= std::mem::size_of::<OutHeader>()).then(|| {
            let h: OutHeader = self.mem.read_obj(GuestAddress(slot + REPLY)).unwrap();
            assert_eq!(h.unique, self.unique, "reply to another request");
            assert_eq!(h.len, used_len, "header length vs used length");
            h
        });
        let mut data = vec![0u8; (used_len as usize).saturating_sub(16)];
        self.mem
            .read_slice(&mut data, GuestAddress(slot + REPLY + 16))
            .unwrap();
        Reply {
            used_len,
            hdr,
            data,
        }
    }

    /// One FUSE request the way Linux lays it out: one readable descriptor
    /// with header and arguments, one writable one for the reply.
    fn call_on(&mut self, q: usize, opcode: u32, nodeid: u64, body: &[u8], out: u32) -> Reply {
        let (slot, len) = self.write_request(opcode, nodeid, body);
        let d = self.descs(q, 2);
        if out == 0 {
            self.table(q, d, raw(slot, u32::try_from(len).unwrap(), 0, 0));
        } else {
            self.table(q, d, raw(slot, u32::try_from(len).unwrap(), NEXT, d + 1));
            self.table(q, d + 1, raw(slot + REPLY, out, WRITE, 0));
        }
        let used = self.submit(q, d);
        self.read_reply(slot, used)
    }

    fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Reply {
        self.call_on(worker::REQUEST, opcode as u32, nodeid, body, 0x1_0000)
    }

    fn init(&mut self) -> InitOut {
        let flags = guest_init_flags();
        let body = [
            InitIn {
                major: 7,
                minor: 36,
                max_readahead: 0x2_0000,
                flags: u32::try_from(flags).unwrap(),
            }
            .as_slice(),
            InitIn2 {
                flags2: (flags >> 32) as u32,
                unused: [0; 11],
            }
            .as_slice(),
        ]
        .concat();
        let r = self.call(Opcode::Init, 0, &body);
        obj(r.ok())
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let r = self.call(Opcode::Lookup, parent, &cstr(name));
        match r.hdr.unwrap().error {
            0 => Ok(obj(&r.data)),
            e => Err(-e),
        }
    }

    fn forget(&mut self, nodeid: u64, n: u64) {
        let r = self.call_on(
            worker::HIPRIO,
            Opcode::Forget as u32,
            nodeid,
            ForgetIn { nlookup: n }.as_slice(),
            0,
        );
        assert_eq!(r.used_len, 0, "FORGET got a reply");
    }

    fn getattr(&mut self, nodeid: u64) -> Result<Attr, i32> {
        let r = self.call(Opcode::Getattr, nodeid, GetattrIn::default().as_slice());
        match r.hdr.unwrap().error {
            0 => Ok(obj::<AttrOut>(&r.data).attr),
            e => Err(-e),
        }
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, i32> {
        self.open_out(nodeid, flags).map(|out| out.fh)
    }

    fn open_out(&mut self, nodeid: u64, flags: i32) -> Result<OpenOut, i32> {
        let body = OpenIn {
            flags: u32::from_ne_bytes(flags.to_ne_bytes()),
            fuse_flags: 0,
        };
        let r = self.call(Opcode::Open, nodeid, body.as_slice());
        match r.hdr.unwrap().error {
            0 => Ok(obj::<OpenOut>(&r.data)),
            e => Err(-e),
        }
    }

    /// Opens and releases `nodeid`: whether the open kept the guest's
    /// cached pages (FOPEN_KEEP_CACHE).
    fn open_keeps_cache(&mut self, nodeid: u64) -> bool {
        let out = self.open_out(nodeid, libc::O_RDONLY).unwrap();
        self.release(nodeid, out.fh);
        out.open_flags & KEEP_CACHE != 0
    }

    fn opendir(&mut self, nodeid: u64) -> u64 {
        let body = OpenIn::default();
        obj::<OpenOut>(self.call(Opcode::Opendir, nodeid, body.as_slice()).ok()).fh
    }

    fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let body = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let r = self.call(Opcode::Read, nodeid, body.as_slice());
        match r.hdr.unwrap().error {
            0 => Ok(r.data),
            e => Err(-e),
        }
    }

    fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let hdr = WriteIn {
            fh,
            offset,
            size: tu::small(data.len()),
            ..Default::default()
        };
        let body = [hdr.as_slice(), data].concat();
        let r = self.call(Opcode::Write, nodeid, &body);
        match r.hdr.unwrap().error {
            0 => Ok(obj::<WriteOut>(&r.data).size),
            e => Err(-e),
        }
    }

    fn release(&mut self, nodeid: u64, fh: u64) {
        let body = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Release, nodeid, body.as_slice()).ok();
    }

    /// Entry names of a READDIR (plain) of a directory, all in one call.
    fn readdir(&mut self, nodeid: u64) -> Vec<String> {
        let fh = self.opendir(nodeid);
        let body = ReadIn {
            fh,
            size: 0x8000,
            ..Default::default()
        };
        let r = self.call(Opcode::Readdir, nodeid, body.as_slice());
        let mut names = Vec::new();
        let mut rest = r.ok();
        while rest.len() >= std::mem::size_of::<Dirent>() {
            let d: Dirent = obj(rest);
            let start = std::mem::size_of::<Dirent>();
            let name = &rest[start..start + d.namelen as usize];
            names.push(String::from_utf8(name.to_vec()).unwrap());
            let reclen = (start + d.namelen as usize).next_multiple_of(8);
            rest = &rest[reclen.min(rest.len())..];
        }
        let rel = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Releasedir, nodeid, rel.as_slice()).ok();
        names.sort();
        names
    }

    fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: i32,
        mode: u32,
    ) -> Result<(EntryOut, u64), i32> {
        let args = CreateIn {
            flags: u32::from_ne_bytes(flags.to_ne_bytes()),
            mode,
            umask: 0,
            fuse_flags: 0,
        };
        let body = [args.as_slice(), &cstr(name)].concat();
        let r = self.call(Opcode::Create, parent, &body);
        match r.hdr.unwrap().error {
            0 => {
                let e: EntryOut = obj(&r.data);
                let o: OpenOut = obj(&r.data[std::mem::size_of::<EntryOut>()..]);
                Ok((e, o.fh))
            }
            e => Err(-e),
        }
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let body = [
            MkdirIn {
                mode: 0o755,
                umask: 0,
            }
            .as_slice(),
            &cstr(name),
        ]
        .concat();
        let r = self.call(Opcode::Mkdir, parent, &body);
        match r.hdr.unwrap().error {
            0 => Ok(obj(&r.data)),
            e => Err(-e),
        }
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
        let args = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let body = [args.as_slice(), &cstr(name)].concat();
        let r = self.call(Opcode::Mknod, parent, &body);
        match r.hdr.unwrap().error {
            0 => Ok(obj(&r.data)),
            e => Err(-e),
        }
    }

    fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        let r = self.call(Opcode::Readlink, nodeid, &[]);
        match r.hdr.unwrap().error {
            0 => Ok(r.data),
            e => Err(-e),
        }
    }
}

/// The flags a Linux 6.1 guest offers in FUSE_INIT (the ones that matter here).
fn guest_init_flags() -> u64 {
    use fuse_backend_rs::api::filesystem::FsOptions as F;
    (F::ASYNC_READ
        | F::BIG_WRITES
        | F::DO_READDIRPLUS
        | F::READDIRPLUS_AUTO
        | F::MAX_PAGES
        | F::PARALLEL_DIROPS
        | F::INIT_EXT)
        .bits()
}

/// A shared directory with a file, a subdirectory and a symlink pointing out.
fn populated(name: &str) -> TestDir {
    let dir = test_dir(name);
    std::fs::write(dir.join("hello.txt"), b"hello from the host\n").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/inner"), vec![7u8; 10_000]).unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../..", dir.join("sub/up")).unwrap();
    dir
}

fn rw() -> FsOptions {
    FsOptions::default()
}

#[test]
fn config_space_holds_tag_and_queue_count_and_bad_arguments_are_refused() {
    let dir = test_dir("config");
    let fs = Fs::new("husk", &dir, rw()).unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[1024, 1024]);
    assert_eq!(
        fs.avail_features(),
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
    );
    let mut cfg = [0xffu8; 44];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..4], b"husk");
    assert!(cfg[4..36].iter().all(|&b| b == 0), "tag not NUL padded");
    assert_eq!(&cfg[36..40], &1u32.to_le_bytes());
    assert_eq!(&cfg[40..], &[0; 4]);
    let mut b = [0xffu8; 4];
    fs.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    let mut nq = [0u8; 4];
    fs.read_config(36, &mut nq);
    assert_eq!(u32::from_le_bytes(nq), 1);

    let long = "x".repeat(37);
    for bad in ["", long.as_str(), "a/b", "tag with space", "tägg", "a\0b"] {
        match Fs::new(bad, &dir, rw()) {
            Err(FsError::InvalidTag { tag, .. }) => assert_eq!(tag, bad),
            Err(e) => panic!("{bad:?}: {e}"),
            Ok(_) => panic!("tag {bad:?} accepted"),
        }
    }
    assert!(Fs::new(&"x".repeat(36), &dir, rw()).is_ok());
    let Err(e) = Fs::new("husk", &dir.join("missing"), rw()) else {
        panic!("missing directory accepted")
    };
    assert!(matches!(e, FsError::SharedDir { .. }));
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::write(dir.join("file"), b"").unwrap();
    assert!(matches!(
        Fs::new("husk", &dir.join("file"), rw()),
        Err(FsError::NotADirectory(_))
    ));
    // A symlink to the directory is resolved once, at creation.
    std::fs::create_dir(dir.join("real")).unwrap();
    std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
    let fs = Fs::new("husk", &dir.join("link"), rw()).unwrap();
    assert_eq!(fs.shared_dir(), dir.join("real").canonicalize().unwrap());
}

#[test]
fn serves_init_lookup_getattr_open_read_and_readdir() {
    let dir = populated("basic");
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    let init = g.init();
    assert_eq!(init.major, 7);
    assert!(init.minor >= 31, "minor {}", init.minor);
    assert_eq!(init.max_pages, 256);
    assert_eq!(init.max_write, 1 << 20);

    let root = g.getattr(1).unwrap();
    assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(root.ino, std::fs::metadata(&dir).unwrap().ino());

    let e = g.lookup(1, "hello.txt").unwrap();
    assert!(e.nodeid > 1);
    assert_eq!(e.attr.size, 20);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(e.entry_valid, 1, "auto caches entries for 1 s");
    assert_eq!(g.getattr(e.nodeid).unwrap().size, 20);
    assert_eq!(g.lookup(1, "nope").err(), Some(libc::ENOENT));

    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        g.read(e.nodeid, fh, 0, 4096).unwrap(),
        b"hello from the host\n"
    );
    assert_eq!(g.read(e.nodeid, fh, 11, 4).unwrap(), b"the ");
    assert_eq!(g.read(e.nodeid, fh, 100, 4).unwrap(), b"");
    g.release(e.nodeid, fh);
    // The handle is gone.
    assert_eq!(g.read(e.nodeid, fh, 0, 4), Err(libc::EBADF));

    // A larger file in a subdirectory, read in pieces.
    let sub = g.lookup(1, "sub").unwrap();
    let inner = g.lookup(sub.nodeid, "inner").unwrap();
    let fh = g.open(inner.nodeid, libc::O_RDONLY).unwrap();
    let mut all = g.read(inner.nodeid, fh, 0, 8192).unwrap();
    all.extend(g.read(inner.nodeid, fh, 8192, 8192).unwrap());
    assert_eq!(all, vec![7u8; 10_000]);

    assert_eq!(g.readdir(1), ["escape", "hello.txt", "sub"]);
    assert_eq!(g.readdir(sub.nodeid), ["inner", "up"]);

    // READDIRPLUS hands out entries (and lookup counts) for every name.
    let fh = g.opendir(1);
    let body = ReadIn {
        fh,
        size: 0x8000,
        ..Default::default()
    };
    let r = g.call(Opcode::Readdirplus, 1, body.as_slice());
    let first: Direntplus = obj(r.ok());
    assert!(first.entry_out.nodeid > 1);
    let hello = g.lookup(1, "hello.txt").unwrap();
    assert_eq!(hello.nodeid, e.nodeid, "same file, same node id");
}

/// FOPEN_KEEP_CACHE in OpenOut::open_flags.
const KEEP_CACHE: u32 = 1 << 1;

#[test]
fn an_open_keeps_cached_pages_only_of_a_file_unchanged_since_the_last_open() {
    let dir = populated("keep-cache");
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    let hello = g.lookup(1, "hello.txt").unwrap().nodeid;
    assert!(
        !g.open_keeps_cache(hello),
        "a first open has nothing to keep"
    );
    assert!(g.open_keeps_cache(hello), "unchanged since the last open");
    assert!(g.open_keeps_cache(hello));

    // The host rewrites it with as many bytes: the times tell.
    let path = dir.join("hello.txt");
    std::fs::write(&path, b"HELLO FROM THE HOST\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(946_684_800))
        .unwrap();
    assert!(!g.open_keeps_cache(hello), "changed on the host");
    let fh = g.open(hello, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(hello, fh, 0, 64).unwrap(), b"HELLO FROM THE HOST\n");
    g.release(hello, fh);
    assert!(g.open_keeps_cache(hello), "unchanged again");
    std::fs::write(&path, b"longer than it was before\n").unwrap();
    assert!(!g.open_keeps_cache(hello), "resized on the host");

    // A forgotten inode's pages are gone from the guest: its next open
    // (after a new lookup) is a first one.
    let sub = g.lookup(1, "sub").unwrap().nodeid;
    let inner = g.lookup(sub, "inner").unwrap().nodeid;
    assert!(!g.open_keeps_cache(inner));
    assert!(g.open_keeps_cache(inner));
    g.forget(inner, 1);
    let inner = g.lookup(sub, "inner").unwrap().nodeid;
    assert!(
        !g.open_keeps_cache(inner),
        "forgotten, then looked up again"
    );

    // Only close-to-open caching revalidates: `never` keeps nothing,
    // `always` keeps everything.
    for (cache, kept) in [(CachePolicy::Never, false), (CachePolicy::Always, true)] {
        let options = FsOptions {
            cache,
            ..FsOptions::default()
        };
        let mut g = Guest::new(&m, Fs::new("husk", &dir, options).unwrap());
        g.init();
        let hello = g.lookup(1, "hello.txt").unwrap().nodeid;
        for _ in 0..2 {
            assert_eq!(g.open_keeps_cache(hello), kept, "{cache:?}");
        }
    }
}

#[test]
fn a_read_only_share_refuses_every_change_and_a_writable_one_takes_them() {
    let dir = populated("ro");
    let m = mem(MEM_SIZE);
    let opts = FsOptions {
        read_only: true,
        ..rw()
    };
    let mut g = Guest::new(&m, Fs::new("husk", &dir, opts).unwrap());
    g.init();
    let e = g.lookup(1, "hello.txt").unwrap();
    assert_eq!(g.open(e.nodeid, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(g.open(e.nodeid, libc::O_RDWR), Err(libc::EROFS));
    assert_eq!(
        g.open(e.nodeid, libc::O_RDONLY | libc::O_TRUNC),
        Err(libc::EROFS)
    );
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.write(e.nodeid, fh, 0, b"overwritten"), Err(libc::EROFS));
    assert_eq!(
        g.create(1, "new", libc::O_WRONLY | libc::O_CREAT, 0o644)
            .err(),
        Some(libc::EROFS)
    );
    assert_eq!(g.mkdir(1, "newdir").err(), Some(libc::EROFS));
    assert_eq!(
        g.mknod(1, "fifo", libc::S_IFIFO | 0o644, 0).err(),
        Some(libc::EROFS)
    );
    let r = g.call(Opcode::Unlink, 1, &cstr("hello.txt"));
    assert_eq!(r.errno(), libc::EROFS);
    let setattr = SetattrIn {
        valid: 1 << 3, // FATTR_SIZE
        size: 0,
        ..Default::default()
    };
    let r = g.call(Opcode::Setattr, e.nodeid, setattr.as_slice());
    assert_eq!(r.errno(), libc::EROFS);
    let rename = [
        RenameIn { newdir: 1 }.as_slice(),
        &cstr("hello.txt"),
        &cstr("moved"),
    ]
    .concat();
    assert_eq!(g.call(Opcode::Rename, 1, &rename).errno(), libc::EROFS);
    let r = g.call(Opcode::Statfs, 1, &[]);
    let st: Kstatfs = obj(r.ok());
    assert!(st.blocks > 0);
    assert_eq!(
        std::fs::read(dir.join("hello.txt")).unwrap(),
        b"hello from the host\n"
    );
    assert!(!dir.join("new").exists() && !dir.join("newdir").exists());

    // The same requests on a writable share do change the host directory.
    let dir = populated("rw");
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    let (e, fh) = g
        .create(1, "new", libc::O_RDWR | libc::O_CREAT, 0o640)
        .unwrap();
    assert_eq!(g.write(e.nodeid, fh, 0, b"from the guest").unwrap(), 14);
    g.release(e.nodeid, fh);
    let meta = std::fs::metadata(dir.join("new")).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o640,
        "guest mode not kept"
    );
    assert_eq!(std::fs::read(dir.join("new")).unwrap(), b"from the guest");
    g.mkdir(1, "newdir").unwrap();
    assert!(dir.join("newdir").is_dir());
    let e = g.lookup(1, "hello.txt").unwrap();
    let fh = g.open(e.nodeid, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    g.release(e.nodeid, fh);
    assert_eq!(std::fs::read(dir.join("hello.txt")).unwrap(), b"");
}

#[test]
fn the_guest_cannot_leave_the_shared_directory() {
    let dir = populated("confine");
    // Something outside the share the guest must not reach.
    let outside = TestDir(dir.parent().unwrap().join(format!(
        "{}-outside",
        dir.file_name().unwrap().to_str().unwrap()
    )));
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    let outside_name = outside.file_name().unwrap().to_str().unwrap().to_owned();
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();

    // `..` of the root is the root; so is `..` of a subdirectory's `..`.
    assert_eq!(g.lookup(1, "..").unwrap().nodeid, 1);
    let sub = g.lookup(1, "sub").unwrap();
    assert_eq!(g.lookup(sub.nodeid, "..").unwrap().nodeid, 1);
    assert_eq!(g.lookup(1, ".").unwrap().nodeid, 1);
    // Nothing resolves more than one component.
    assert_eq!(
        g.lookup(1, &format!("../{outside_name}/secret")).err(),
        Some(libc::EINVAL)
    );
    assert_eq!(g.lookup(1, "sub/inner").err(), Some(libc::EINVAL));
    assert_eq!(g.lookup(1, &outside_name).err(), Some(libc::ENOENT));

    // An absolute symlink is the link itself: not followed on the host.
    let esc = g.lookup(1, "escape").unwrap();
    assert_eq!(esc.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(g.readlink(esc.nodeid).unwrap(), b"/etc");
    assert!(g.lookup(esc.nodeid, "passwd").is_err());
    assert!(g.open(esc.nodeid, libc::O_RDONLY).is_err());
    // A relative one pointing above the root: same.
    let up = g.lookup(sub.nodeid, "up").unwrap();
    assert_eq!(up.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(g.lookup(up.nodeid, &outside_name).is_err());
    assert!(g.lookup(up.nodeid, "..").is_err());

    // Creating with names that are not one plain component fails.
    for name in ["..", ".", "a/b", "../escaped"] {
        assert_eq!(g.mkdir(1, name).err(), Some(libc::EINVAL), "mkdir {name:?}");
    }
    let rename = [
        RenameIn { newdir: 1 }.as_slice(),
        &cstr("hello.txt"),
        &cstr(&format!("../{outside_name}/moved")),
    ]
    .concat();
    assert_eq!(g.call(Opcode::Rename, 1, &rename).errno(), libc::EINVAL);

    // Device nodes: a host block device cannot be created, nor a char device
    // other than an overlay whiteout (0:0).
    let sda = u32::try_from(libc::makedev(8, 0)).unwrap();
    let null = u32::try_from(libc::makedev(1, 3)).unwrap();
    assert_eq!(
        g.mknod(1, "sda", libc::S_IFBLK | 0o666, sda).err(),
        Some(libc::EPERM)
    );
    assert_eq!(
        g.mknod(1, "null", libc::S_IFCHR | 0o666, null).err(),
        Some(libc::EPERM)
    );
    assert!(!dir.join("sda").exists() && !dir.join("null").exists());
    let wh = g.mknod(1, "whiteout", libc::S_IFCHR, 0).unwrap();
    assert_eq!(wh.attr.mode & libc::S_IFMT, libc::S_IFCHR);
    // A FIFO can be created but is never opened on the host (it would block the worker).
    let fifo = g.mknod(1, "fifo", libc::S_IFIFO | 0o666, 0).unwrap();
    assert!(g.open(fifo.nodeid, libc::O_RDONLY).is_err());
    assert!(g.open(wh.nodeid, libc::O_RDONLY).is_err());
    // The device still answers.
    assert_eq!(g.getattr(1).unwrap().mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"host secret"
    );
}

/// umask(2) of the process, read without changing it for good.
fn process_umask() -> u32 {
    // SAFETY: umask has no memory arguments; the old value is restored at once.
    unsafe {
        let m = libc::umask(0o077);
        libc::umask(m);
        m
    }
}

#[test]
fn init_does_not_change_the_shims_umask_and_reset_stops_the_worker() {
    let dir = populated("umask");
    // A umask only this test sets: with the bug this guards against, any
    // device's worker would set it to 0 for the whole process.
    // SAFETY: umask has no memory arguments.
    unsafe { libc::umask(0o022) };
    let before = process_umask();
    assert_eq!(before, 0o022);
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    // PassthroughFs set the worker's umask to 0...
    let (e, fh) = g
        .create(1, "modes", libc::O_RDWR | libc::O_CREAT, 0o666)
        .unwrap();
    g.release(e.nodeid, fh);
    assert_eq!(
        std::fs::metadata(dir.join("modes")).unwrap().mode() & 0o777,
        0o666
    );
    // ...and only the worker's.
    assert_eq!(process_umask(), before);

    let tid = g.fs().worker_tid().unwrap();
    let task = PathBuf::from(format!("/proc/self/task/{tid}"));
    assert_eq!(
        std::fs::read_to_string(task.join("comm")).unwrap().trim(),
        "husk-fs"
    );
    g.fs().reset();
    assert!(
        tu::thread_gone(tid),
        "worker thread still running after reset"
    );
    g.fs().reset(); // idempotent
}

#[test]
fn a_driver_reset_starts_over_with_a_fresh_file_system() {
    let dir = populated("restart");
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    let e = g.lookup(1, "hello.txt").unwrap();
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    g.restart();
    // Before FUSE_INIT nothing is served, not even the root.
    assert_eq!(g.getattr(1).err(), Some(libc::EBADF));
    g.init();
    // Node ids and handles of the previous driver instance are gone.
    assert_eq!(g.getattr(e.nodeid).err(), Some(libc::EBADF));
    assert_eq!(g.read(e.nodeid, fh, 0, 4), Err(libc::EBADF));
    let e = g.lookup(1, "hello.txt").unwrap();
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(e.nodeid, fh, 0, 5).unwrap(), b"hello");
}

fn mount_tmpfs(at: &Path) {
    let target = CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings (or null data) for the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=1m".as_ptr().cast(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount tmpfs (tests run as root): {}",
        std::io::Error::last_os_error()
    );
}

fn umount(at: &Path, flags: i32) -> std::io::Result<()> {
    let target = CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn mounts_made_after_the_device_started_are_seen_and_need_a_lazy_unmount() {
    let dir = test_dir("mounts");
    let rootfs = dir.join("c1/rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    let c1 = g.lookup(1, "c1").unwrap();
    let before = g.lookup(c1.nodeid, "rootfs").unwrap();
    assert!(g.readdir(before.nodeid).is_empty());

    // The shim mounts the container's rootfs after the VM booted.
    mount_tmpfs(&rootfs);
    std::fs::write(rootfs.join("bin"), b"binary").unwrap();
    let after = g.lookup(c1.nodeid, "rootfs").unwrap();
    assert_ne!(
        after.nodeid, before.nodeid,
        "still the directory under the mount"
    );
    assert_eq!(g.readdir(after.nodeid), ["bin"]);
    let bin = g.lookup(after.nodeid, "bin").unwrap();
    let fh = g.open(bin.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(bin.nodeid, fh, 0, 64).unwrap(), b"binary");
    // `..` from the mount's root is the mountpoint's parent, inside the share.
    assert_eq!(g.lookup(after.nodeid, "..").unwrap().nodeid, c1.nodeid);
    g.release(bin.nodeid, fh);

    // The device holds descriptors into the mount: only a lazy unmount works.
    let busy = umount(&rootfs, 0).unwrap_err();
    assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
    umount(&rootfs, libc::MNT_DETACH).unwrap();
    let again = g.lookup(c1.nodeid, "rootfs").unwrap();
    assert_eq!(again.nodeid, before.nodeid);
    assert!(g.readdir(again.nodeid).is_empty());
}

#[test]
fn host_descriptors_held_for_the_guest_are_capped() {
    let dir = test_dir("budget");
    for i in 0..8 {
        std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
    }
    let m = mem(MEM_SIZE);
    let opts = FsOptions {
        max_host_fds: Some(4),
        ..rw()
    };
    let mut g = Guest::new(&m, Fs::new("husk", &dir, opts).unwrap());
    g.init();
    let f0 = g.lookup(1, "f0").unwrap();
    let f1 = g.lookup(1, "f1").unwrap();
    let fh = g.open(f0.nodeid, libc::O_RDONLY).unwrap();
    let f2 = g.lookup(1, "f2").unwrap();
    // Four held: a new inode is refused, a known one is still found, the root is free.
    assert_eq!(g.lookup(1, "f3").err(), Some(libc::ENFILE));
    assert_eq!(g.lookup(1, "f1").unwrap().nodeid, f1.nodeid);
    assert_eq!(g.lookup(1, "..").unwrap().nodeid, 1);
    assert_eq!(g.open(f1.nodeid, libc::O_RDONLY), Err(libc::ENFILE));
    assert_eq!(g.mkdir(1, "d").err(), Some(libc::ENFILE));
    assert!(!dir.join("d").exists(), "refused creation happened anyway");
    // Closing the file makes room for one more.
    g.release(f0.nodeid, fh);
    let f3 = g.lookup(1, "f3").unwrap();
    assert_eq!(g.lookup(1, "f4").err(), Some(libc::ENFILE));
    // f1 was looked up twice: one FORGET is not enough.
    g.forget(f1.nodeid, 1);
    assert_eq!(g.lookup(1, "f4").err(), Some(libc::ENFILE));
    // Forgetting more than was looked up frees it once, not twice.
    g.forget(f1.nodeid, 100);
    g.lookup(1, "f4").unwrap();
    assert_eq!(g.lookup(1, "f5").err(), Some(libc::ENFILE));
    // READDIRPLUS cannot go over budget either: all entries are known or refused.
    for e in [f0, f2, f3] {
        g.forget(e.nodeid, 1);
    }
    let dfh = g.opendir(1); // 2 held: f4 and this handle
    let body = ReadIn {
        fh: dfh,
        size: 0x8000,
        ..Default::default()
    };
    let r = g.call(Opcode::Readdirplus, 1, body.as_slice());
    let mut rest = r.ok();
    let mut names = Vec::new();
    while rest.len() >= std::mem::size_of::<Direntplus>() {
        let d: Direntplus = obj(rest);
        let start = std::mem::size_of::<Direntplus>();
        names.push(
            String::from_utf8(rest[start..start + d.dirent.namelen as usize].to_vec()).unwrap(),
        );
        let len = (start + d.dirent.namelen as usize).next_multiple_of(8);
        rest = &rest[len.min(rest.len())..];
    }
    // f4 and the handle leave room for two new inodes (f4 itself may come too).
    assert!((2..=3).contains(&names.len()), "{names:?}");
    let unseen = (0..8)
        .map(|i| format!("f{i}"))
        .find(|n| n != "f4" && !names.contains(n))
        .unwrap();
    assert_eq!(g.lookup(1, &unseen).err(), Some(libc::ENFILE));
}

#[test]
fn malformed_chains_get_an_error_or_are_dropped_and_never_stall_the_device() {
    let dir = populated("malformed");
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    let q = worker::REQUEST;
    let probe = |g: &mut Guest| assert!(g.getattr(1).is_ok(), "device stopped answering");

    // No writable descriptor: nothing can be answered.
    let r = g.call_on(
        q,
        Opcode::Getattr as u32,
        1,
        GetattrIn::default().as_slice(),
        0,
    );
    assert_eq!(r.used_len, 0);
    // A reply buffer too small for the reply: the error header still fits.
    let r = g.call_on(q, Opcode::Lookup as u32, 1, &cstr("hello.txt"), 16);
    assert_eq!(r.errno(), libc::EINVAL);
    // Too small even for an error header.
    let r = g.call_on(
        q,
        Opcode::Getattr as u32,
        1,
        GetattrIn::default().as_slice(),
        8,
    );
    assert_eq!(r.used_len, 0);
    // Unknown opcode.
    let r = g.call_on(q, 4242, 1, &[0; 16], 4096);
    assert_eq!(r.errno(), libc::ENOSYS);
    // A name without its NUL, a READ whose arguments are cut short.
    assert_eq!(
        g.call(Opcode::Lookup, 1, b"hello.txt").errno(),
        libc::EINVAL
    );
    assert_eq!(g.call(Opcode::Read, 1, &[0; 8]).errno(), libc::EINVAL);
    // Operations on node ids and handles that were never handed out.
    assert_eq!(g.getattr(0xdead_beef).err(), Some(libc::EBADF));
    assert_eq!(g.read(1, 77, 0, 10), Err(libc::EBADF));
    probe(&mut g);

    // The header says 4 GiB.
    let (slot, _) = g.write_request(Opcode::Lookup as u32, 1, &cstr("hello.txt"));
    g.mem.write_obj(u32::MAX, GuestAddress(slot)).unwrap();
    let d = g.descs(q, 2);
    g.table(q, d, raw(slot, 50, NEXT, d + 1));
    g.table(q, d + 1, raw(slot + REPLY, 4096, WRITE, 0));
    let used = g.submit(q, d);
    assert_eq!(g.read_reply(slot, used).errno(), libc::ENOMEM);

    // A header split over three descriptors is fine.
    let (slot, _) = g.write_request(Opcode::Getattr as u32, 1, GetattrIn::default().as_slice());
    let d = g.descs(q, 4);
    g.table(q, d, raw(slot, 7, NEXT, d + 1));
    g.table(q, d + 1, raw(slot + 7, 30, NEXT, d + 2));
    g.table(q, d + 2, raw(slot + 37, 19, NEXT, d + 3));
    g.table(q, d + 3, raw(slot + REPLY, 4096, WRITE, 0));
    let used = g.submit(q, d);
    let attr: AttrOut = obj(g.read_reply(slot, used).ok());
    assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFDIR);

    // Fewer bytes than a FUSE header: dropped unanswered.
    let (slot, _) = g.write_request(Opcode::Getattr as u32, 1, &[]);
    let d = g.descs(q, 2);
    g.table(q, d, raw(slot, 20, NEXT, d + 1));
    g.table(q, d + 1, raw(slot + REPLY, 4096, WRITE, 0));
    assert_eq!(g.submit(q, d), 0);

    // Buffers outside guest memory, or straddling its end.
    let d = g.descs(q, 2);
    g.table(q, d, raw(0xffff_ffff_0000, 64, NEXT, d + 1));
    g.table(q, d + 1, raw(SLOT_BASE + REPLY, 4096, WRITE, 0));
    assert_eq!(g.submit(q, d), 0);
    let (slot, _) = g.write_request(Opcode::Getattr as u32, 1, GetattrIn::default().as_slice());
    let d = g.descs(q, 2);
    g.table(q, d, raw(slot, 56, NEXT, d + 1));
    g.table(q, d + 1, raw(MEM_SIZE as u64 - 8, 4096, WRITE, 0));
    assert_eq!(g.submit(q, d), 0);

    // A descriptor loop.
    let (slot, _) = g.write_request(Opcode::Getattr as u32, 1, GetattrIn::default().as_slice());
    let d = g.descs(q, 2);
    g.table(q, d, raw(slot, 56, NEXT, d + 1));
    g.table(q, d + 1, raw(slot + REPLY, 4096, WRITE | NEXT, d));
    let used = g.submit(q, d);
    assert!(used == 0 || g.read_reply(slot, used).hdr.is_some());
    probe(&mut g);

    // 128 writable descriptors aliasing the same 1 MiB: 128 MiB "available",
    // cut to MAX_CHAIN_BYTES; a READDIR asking for 64 MiB is refused.
    let fh = g.opendir(1);
    let (slot, _) = g.write_request(
        Opcode::Readdir as u32,
        1,
        ReadIn {
            fh,
            size: 64 << 20,
            ..Default::default()
        }
        .as_slice(),
    );
    let d = g.descs(q, 129);
    g.table(q, d, raw(slot, 80, NEXT, d + 1));
    for i in 1..=128u16 {
        let flags = if i < 128 { WRITE | NEXT } else { WRITE };
        g.table(q, d + i, raw(slot + REPLY, 1 << 20, flags, d + i + 1));
    }
    let used = g.submit(q, d);
    assert_eq!(g.read_reply(slot, used).errno(), libc::ENOMEM);

    // A GETXATTR asking for 4 GiB (xattrs are off: ENOSYS without allocating).
    let body = [
        GetxattrIn {
            size: u32::MAX,
            padding: 0,
        }
        .as_slice(),
        &cstr("user.x"),
    ]
    .concat();
    assert_eq!(g.call(Opcode::Getxattr, 1, &body).errno(), libc::ENOSYS);

    // A head index beyond the queue: consumed, nothing stalls.
    g.queues[q].push_avail(QSIZE + 5);
    kick(&g.notify, q);
    std::thread::sleep(Duration::from_millis(50));
    // The device may or may not return it; either way, resync and go on.
    g.seen[q] = g.used_idx(q);
    probe(&mut g);
    assert_eq!(g.readdir(1), ["escape", "hello.txt", "sub"]);
}

#[test]
fn requests_in_indirect_tables_and_on_the_hiprio_queue_are_served() {
    let dir = populated("indirect");
    let m = mem(MEM_SIZE);
    let mut g = Guest::new(&m, Fs::new("husk", &dir, rw()).unwrap());
    g.init();
    let (slot, len) = g.write_request(Opcode::Lookup as u32, 1, &cstr("hello.txt"));
    let table = slot + 0x1_0000;
    m.write_obj(
        raw(slot, u32::try_from(len).unwrap(), NEXT, 1),
        GuestAddress(table),
    )
    .unwrap();
    m.write_obj(raw(slot + REPLY, 4096, WRITE, 0), GuestAddress(table + 16))
        .unwrap();
    let d = g.descs(worker::REQUEST, 1);
    g.table(worker::REQUEST, d, raw(table, 32, tu::DESC_F_INDIRECT, 0));
    let used = g.submit(worker::REQUEST, d);
    let e: EntryOut = obj(g.read_reply(slot, used).ok());
    assert_eq!(e.attr.size, 20);
    // Any request works on hiprio too; FORGETs there drop lookups.
    let r = g.call_on(
        worker::HIPRIO,
        Opcode::Getattr as u32,
        e.nodeid,
        GetattrIn::default().as_slice(),
        4096,
    );
    assert_eq!(obj::<AttrOut>(r.ok()).attr.size, 20);
    g.forget(e.nodeid, 1);
    assert_eq!(
        g.getattr(e.nodeid).err(),
        Some(libc::EBADF),
        "forgotten inode still served"
    );
    // A BATCH_FORGET that claims more entries than it carries.
    let body = [
        BatchForgetIn {
            count: 1000,
            dummy: 0,
        }
        .as_slice(),
        ForgetOne {
            nodeid: 1,
            nlookup: 1,
        }
        .as_slice(),
    ]
    .concat();
    let r = g.call_on(worker::HIPRIO, Opcode::BatchForget as u32, 0, &body, 4096);
    assert_eq!(r.used_len, 0, "BATCH_FORGET got a reply");
    assert!(g.getattr(1).is_ok());
}

#[test]
fn fuzz_entry_point_runs_its_seeds() {
    // Also writes them out as the fuzzer's starting corpus when asked to (see fuzz/README.md).
    let out = std::env::var_os("HUSK_FS_FUZZ_SEED_DIR").map(PathBuf::from);
    // The harness changes the mount namespace and umask of the thread it runs on.
    std::thread::spawn(move || {
        let seeds = super::fuzz::seeds();
        for (i, seed) in seeds.iter().enumerate() {
            let o = super::fuzz::fuzz_requests(seed);
            assert!(o.replies > 0, "seed {i}: {o:?}");
            assert!(
                o.errors < o.replies,
                "seed {i}: every request failed: {o:?}"
            );
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
        tu::run_corpus("virtio_fs", &seeds, 0, 0, |input| {
            super::fuzz::fuzz_requests(input);
        });
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..300 {
            let mut input = seeds[0].clone();
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = usize::try_from(x % input.len() as u64).unwrap();
                input[at] = tu::low_byte(x >> 32);
            }
            super::fuzz::fuzz_requests(&input);
        }
    })
    .join()
    .unwrap();
    // The tmpfs went with the harness thread's mount namespace; its mountpoint stays.
    let base = std::env::temp_dir().join(format!("husk-fs-fuzz-{}", std::process::id()));
    std::fs::remove_dir(base).unwrap();
}

/// (resident set size, private dirty memory) of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let field = |file: &str, name: &str| -> u64 {
        let text = std::fs::read_to_string(file).unwrap();
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (
        field("/proc/self/status", "VmRSS:"),
        field("/proc/self/smaps_rollup", "Private_Dirty:"),
    )
}

/// A tree like a small container rootfs: 10 directories of 20 files.
fn rootfs_like(name: &str) -> TestDir {
    let dir = populated(name);
    for d in 0..10 {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..20 {
            std::fs::write(sub.join(format!("f{f}")), vec![b'x'; 1000 + f * 100]).unwrap();
        }
    }
    dir
}

/// FUSE requests `walk` sends.
const WALK_REQUESTS: usize = 10 * (1 + 3 + 20 * 2 + 5 * 3);

/// What a guest does right after mounting a rootfs: look at every entry,
/// read some files.
fn walk(g: &mut Guest) {
    for d in 0..10 {
        let dir = g.lookup(1, &format!("d{d}")).unwrap();
        assert_eq!(g.readdir(dir.nodeid).len(), 20);
        for f in 0..20 {
            let e = g.lookup(dir.nodeid, &format!("f{f}")).unwrap();
            g.getattr(e.nodeid).unwrap();
            if f % 4 == 0 {
                let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
                assert_eq!(g.read(e.nodeid, fh, 0, 4096).unwrap().len(), 1000 + f * 100);
                g.release(e.nodeid, fh);
            }
        }
    }
}

/// Not a check: prints what the in-process device costs, for the module
/// docs. Run alone, in release mode:
/// `cargo test --release -p husk-hypervisor --lib measure_in_process_cost -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_in_process_cost() {
    let dir = rootfs_like("measure");
    let m = mem(MEM_SIZE);
    // Guest RAM the test's "driver" touches is the guest's, not the device's.
    m.write_slice(
        &vec![0u8; usize::try_from(SLOT_BASE + SLOTS * SLOT_SIZE).unwrap()],
        GuestAddress(0),
    )
    .unwrap();
    let mut runs = Vec::new();
    for run in 0..21 {
        // Fresh rings for every device.
        m.write_slice(&[0u8; 0x2_0000], GuestAddress(0)).unwrap();
        let rss0 = rss_kib();
        let t0 = Instant::now();
        let fs = Fs::new("husk", &dir, rw()).unwrap();
        let t_new = t0.elapsed();
        let mut g = Guest::direct(&m, fs);
        let t_active = t0.elapsed();
        g.irq = g.irqfd.take();
        g.init();
        let t_init = t0.elapsed();
        let rss_init = rss_kib();
        walk(&mut g);
        let t_walk = t0.elapsed();
        let rss_walk = rss_kib();
        drop(g);
        println!(
            "run {run:2}: new {:6.1} us, active {:6.1} us, init answered {:6.1} us, \
             walk ({WALK_REQUESTS} requests) {:6.1} ms; RSS (private dirty) \
             +{} (+{}) KiB after init, +{} (+{}) KiB after walk",
            t_new.as_secs_f64() * 1e6,
            t_active.as_secs_f64() * 1e6,
            t_init.as_secs_f64() * 1e6,
            t_walk.as_secs_f64() * 1e3,
            rss_init.0.saturating_sub(rss0.0),
            rss_init.1.saturating_sub(rss0.1),
            rss_walk.0.saturating_sub(rss0.0),
            rss_walk.1.saturating_sub(rss0.1),
        );
        runs.push((t_new, t_active, t_init));
    }
    let median = |f: fn(&(Duration, Duration, Duration)) -> Duration| {
        let mut v: Vec<Duration> = runs[1..].iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "median of runs 1-20: new {:?}, active {:?}, init answered {:?} (run 0 is the process's first device)",
        median(|r| r.0),
        median(|r| r.1),
        median(|r| r.2)
    );
}
