//! Fuzzing entry point (built for `cargo fuzz` and unit tests only):
//! arbitrary bytes become guest memory holding the descriptor tables, rings
//! and buffers of the hiprio and request queues, and the real worker serves
//! them against a real directory.
//!
//! The directory lives on a small tmpfs in a mount namespace of the calling
//! thread's own (so a fuzzed FALLOCATE cannot fill a real disk, and nothing
//! is left mounted when the process dies); it is recreated for every input,
//! so an input means the same thing whenever it runs. Call from one thread;
//! needs root (mount namespace, tmpfs), else it fuzzes a read-only share.
//!
//! ```sh
//! # seeds (well-formed sessions) into the corpus
//! HUSK_FS_FUZZ_SEED_DIR=$PWD/fuzz/corpus/virtio_fs \
//!     cargo test -p husk-hypervisor --lib fs::tests::fuzz_entry_point_runs_its_seeds
//! cd fuzz && cargo +nightly fuzz run virtio_fs -- -jobs=1 -max_total_time=600
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fuse_backend_rs::api::filesystem::{FileSystem, FsOptions as FuseOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{Worker, HIPRIO, REQUEST};
use super::{build_fs, CachePolicy, FsOptions};
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::test_utils::{
    active, desc, fuzz_input, fuzz_memory, interrupt, queue, FUZZ_MEM_SIZE as MEM_SIZE,
};
use crate::devices::virtio::worker::EventLoop;

/// Fixed queue layout (max queue size 64).
pub const QMAX: u16 = 64;
pub const HIPRIO_DESC: u64 = 0x0000;
pub const HIPRIO_AVAIL: u64 = 0x0400;
pub const HIPRIO_USED: u64 = 0x0500;
pub const REQ_DESC: u64 = 0x0800;
pub const REQ_AVAIL: u64 = 0x0c00;
pub const REQ_USED: u64 = 0x0d00;
/// Where the seeds put requests and replies.
const SEED_BUFS: u64 = 0x1000;
const SEED_SLOT: u64 = 0x600;
const SEED_REPLY: u64 = 0x100;

/// Length of the control prefix before the memory image.
pub const PREFIX: usize = 4;

struct Share {
    /// Recreated for every input.
    dir: PathBuf,
    /// Without a private tmpfs, nothing may be written.
    force_read_only: bool,
}

fn mount_private_tmpfs(at: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let last = std::io::Error::last_os_error;
    // SAFETY: unshare takes no pointers. CLONE_NEWNS (which implies CLONE_FS)
    // affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last());
    }
    // SAFETY: valid NUL-terminated strings or null pointers, as mount(2) takes them.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last());
    }
    let target = CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=16m,nr_inodes=4096".as_ptr().cast(),
        )
    } != 0
    {
        return Err(last());
    }
    Ok(())
}

fn share() -> &'static Share {
    static SHARE: OnceLock<Share> = OnceLock::new();
    SHARE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("husk-fs-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&base).expect("fuzz share dir");
        let force_read_only = match mount_private_tmpfs(&base) {
            Ok(()) => false,
            Err(e) => {
                eprintln!("virtio-fs fuzz: no private tmpfs ({e}); fuzzing a read-only share");
                // Still keep PassthroughFs's umask(0) away from the process.
                let _ = super::unshare_fs_context();
                true
            }
        };
        Share {
            dir: base.join("share"),
            force_read_only,
        }
    })
}

/// The tree every input starts from.
fn reset_tree(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("sub/deeper")).expect("fuzz tree");
    std::fs::write(dir.join("hello.txt"), b"hello from the host\n").expect("fuzz tree");
    std::fs::write(dir.join("sub/inner"), [7u8; 3000]).expect("fuzz tree");
    std::os::unix::fs::symlink("/etc", dir.join("escape")).expect("fuzz tree");
    std::os::unix::fs::symlink("../..", dir.join("sub/up")).expect("fuzz tree");
}

/// What one input did (lets the unit tests check the seeds do what they claim).
#[derive(Debug, Default)]
pub struct Outcome {
    /// Chains returned on either queue.
    pub used: u32,
    /// Of those, the ones carrying a reply header...
    pub replies: u32,
    /// ...and of those, the ones with an error.
    pub errors: u32,
}

/// Runs one input. Prefix bytes:
/// 0: hiprio and request queue sizes (1 << (bits 0-2 % 7), 1 << (bits 4-6 % 7));
/// 1: bit 0 read-only share, bit 1 the harness sends FUSE_INIT itself,
///    bit 2 xattrs on, bits 4-5 cache policy;
/// 2: host descriptor budget minus 4;
/// 3: unused (kept for layout compatibility of the corpus).
///
/// The rest is the guest memory image.
pub fn fuzz_requests(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    if data.len() < PREFIX {
        return out;
    }
    let (prefix, image) = data.split_at(PREFIX);
    let s = share();
    reset_tree(&s.dir);
    let mem = fuzz_memory(image);

    let hiprio_size = 1u16 << ((prefix[0] & 7) % 7);
    let req_size = 1u16 << (((prefix[0] >> 4) & 7) % 7);
    let options = FsOptions {
        read_only: prefix[1] & 1 != 0 || s.force_read_only,
        xattr: prefix[1] & 4 != 0,
        cache: match (prefix[1] >> 4) & 3 {
            0 => CachePolicy::Auto,
            1 => CachePolicy::Never,
            2 => CachePolicy::Metadata,
            _ => CachePolicy::Always,
        },
        max_host_fds: Some(4 + u64::from(prefix[2])),
    };
    let fs = build_fs(&s.dir, &options).expect("passthrough fs");
    let queues = [
        active(queue(
            QMAX,
            hiprio_size,
            HIPRIO_DESC,
            HIPRIO_AVAIL,
            HIPRIO_USED,
        )),
        active(queue(QMAX, req_size, REQ_DESC, REQ_AVAIL, REQ_USED)),
    ];
    let worker = Worker::new(mem.clone(), queues, interrupt(), fs).expect("worker");
    let kill = EventFd::new(EFD_NONBLOCK).expect("kill eventfd");
    let mut worker = EventLoop::new(worker, kill).expect("event loop");
    if prefix[1] & 2 != 0 {
        let _ = worker.handler().fs().init(FuseOptions::empty());
    }
    // Both queues start pending; a second round finds nothing new.
    for _ in 0..2 {
        worker.step_nowait();
    }

    for (q, desc, used_ring, size) in [
        (HIPRIO, HIPRIO_DESC, HIPRIO_USED, hiprio_size),
        (REQUEST, REQ_DESC, REQ_USED, req_size),
    ] {
        let _ = q;
        let n: u16 = mem.read_obj(GuestAddress(used_ring + 2)).unwrap_or(0);
        for i in 0..n.min(size) {
            let elem = GuestAddress(used_ring + 4 + 8 * u64::from(i));
            let id: u32 = mem.read_obj(elem).unwrap_or(0);
            let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap_or(0);
            out.used += 1;
            if len < 16 {
                continue;
            }
            out.replies += 1;
            if let Some(error) = reply_error(&mem, desc, size, id) {
                if error != 0 {
                    out.errors += 1;
                }
            }
        }
    }
    out
}

/// The error field of the reply in the first writable descriptor of the
/// chain at `head` (direct descriptors only: that is what the seeds use).
fn reply_error(mem: &GuestMemoryMmap, table: u64, size: u16, head: u32) -> Option<i32> {
    let mut i = u16::try_from(head).ok()?;
    for _ in 0..size {
        if i >= size {
            return None;
        }
        let d = GuestAddress(table + 16 * u64::from(i));
        let addr: u64 = mem.read_obj(d).ok()?;
        let flags: u16 = mem.read_obj(d.unchecked_add(12)).ok()?;
        let next: u16 = mem.read_obj(d.unchecked_add(14)).ok()?;
        if flags & 2 != 0 {
            return mem.read_obj(GuestAddress(addr).checked_add(4)?).ok();
        }
        if flags & 1 == 0 {
            return None;
        }
        i = next;
    }
    None
}

use vm_memory::Address;

/// Well-formed starting points: a guest walking the tree (init, lookups,
/// open, read, readdir), one changing it (create, write, mkdir, rename,
/// setattr, symlink, link, unlink), one poking at the edges (`..`, symlinks
/// out, device nodes, xattrs, odd sizes), and one forgetting on hiprio.
pub fn seeds() -> Vec<Vec<u8>> {
    use fuse_backend_rs::abi::fuse_abi::*;
    use vm_memory::ByteValued;

    fn c(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }
    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }
    let init = {
        let flags = (FuseOptions::ASYNC_READ
            | FuseOptions::BIG_WRITES
            | FuseOptions::DO_READDIRPLUS
            | FuseOptions::MAX_PAGES
            | FuseOptions::INIT_EXT)
            .bits();
        let i = InitIn {
            major: 7,
            minor: 36,
            max_readahead: 0x2_0000,
            flags: u32::try_from(flags).expect("INIT flags in the low word"),
        };
        let i2 = InitIn2 {
            flags2: 0,
            unused: [0; 11],
        };
        (Opcode::Init, 0u64, cat(&[i.as_slice(), i2.as_slice()]))
    };
    let read = |fh: u64, size: u32| ReadIn {
        fh,
        size,
        ..Default::default()
    };
    let open = |flags: i32| OpenIn {
        flags: u32::from_ne_bytes(flags.to_ne_bytes()),
        fuse_flags: 0,
    };
    let release = |fh: u64| ReleaseIn {
        fh,
        ..Default::default()
    };
    // Node ids are handed out from 2 in lookup order, handles from 1.
    let walk = vec![
        init.clone(),
        (Opcode::Lookup, 1, c("hello.txt")), // node 2
        (Opcode::Getattr, 2, GetattrIn::default().as_slice().to_vec()),
        (Opcode::Open, 2, open(libc::O_RDONLY).as_slice().to_vec()), // fh 1
        (Opcode::Read, 2, read(1, 0x300).as_slice().to_vec()),
        (
            Opcode::Lseek,
            2,
            cat(&[&1u64.to_le_bytes(), &5u64.to_le_bytes(), &[0; 8]]),
        ),
        (Opcode::Flush, 2, cat(&[&1u64.to_le_bytes(), &[0; 16]])),
        (Opcode::Release, 2, release(1).as_slice().to_vec()),
        (Opcode::Lookup, 1, c("sub")), // node 3
        (Opcode::Opendir, 3, OpenIn::default().as_slice().to_vec()), // fh 2
        (Opcode::Readdir, 3, read(2, 0x300).as_slice().to_vec()),
        (Opcode::Readdirplus, 3, read(2, 0x300).as_slice().to_vec()),
        (Opcode::Releasedir, 3, release(2).as_slice().to_vec()),
        (Opcode::Statfs, 1, Vec::new()),
        (
            Opcode::Access,
            2,
            AccessIn {
                mask: 4,
                padding: 0,
            }
            .as_slice()
            .to_vec(),
        ),
        (Opcode::Lookup, 3, c("inner")),
    ];
    let change = vec![
        init.clone(),
        (
            Opcode::Create,
            1,
            cat(&[
                CreateIn {
                    flags: (libc::O_RDWR | libc::O_CREAT) as u32,
                    mode: 0o644,
                    umask: 0o022,
                    fuse_flags: 0,
                }
                .as_slice(),
                &c("new"),
            ]),
        ), // node 2, fh 1
        (
            Opcode::Write,
            2,
            cat(&[
                WriteIn {
                    fh: 1,
                    size: 5,
                    ..Default::default()
                }
                .as_slice(),
                b"data!",
            ]),
        ),
        (Opcode::Fsync, 2, cat(&[&1u64.to_le_bytes(), &[0; 8]])),
        (
            Opcode::Fallocate,
            2,
            cat(&[
                &1u64.to_le_bytes(),
                &0u64.to_le_bytes(),
                &4096u64.to_le_bytes(),
                &[0; 8],
            ]),
        ),
        (
            Opcode::Setattr,
            2,
            SetattrIn {
                valid: 1 | 8, // mode, size
                mode: 0o600,
                size: 3,
                ..Default::default()
            }
            .as_slice()
            .to_vec(),
        ),
        (Opcode::Release, 2, release(1).as_slice().to_vec()),
        (
            Opcode::Mkdir,
            1,
            cat(&[
                MkdirIn {
                    mode: 0o755,
                    umask: 0,
                }
                .as_slice(),
                &c("dir"),
            ]),
        ), // node 3
        (
            Opcode::Rename,
            1,
            cat(&[RenameIn { newdir: 3 }.as_slice(), &c("new"), &c("moved")]),
        ),
        (Opcode::Symlink, 3, cat(&[&c("link"), &c("../hello.txt")])), // node 4
        (Opcode::Readlink, 4, Vec::new()),
        (Opcode::Lookup, 1, c("hello.txt")), // node 5
        (
            Opcode::Link,
            3,
            cat(&[LinkIn { oldnodeid: 5 }.as_slice(), &c("hard")]),
        ),
        (Opcode::Unlink, 3, c("link")),
        (Opcode::Rmdir, 1, c("sub")),
        (Opcode::Destroy, 0, Vec::new()),
    ];
    let edges = vec![
        init,
        (Opcode::Lookup, 1, c("..")),
        (Opcode::Lookup, 1, c("../etc")),
        (Opcode::Lookup, 1, c("escape")), // node 2
        (Opcode::Readlink, 2, Vec::new()),
        (Opcode::Lookup, 2, c("passwd")),
        (Opcode::Open, 2, open(libc::O_RDONLY).as_slice().to_vec()),
        (
            Opcode::Mknod,
            1,
            cat(&[
                MknodIn {
                    mode: libc::S_IFBLK | 0o600,
                    rdev: 0x800,
                    umask: 0,
                    padding: 0,
                }
                .as_slice(),
                &c("disk"),
            ]),
        ),
        (
            Opcode::Mknod,
            1,
            cat(&[
                MknodIn {
                    mode: libc::S_IFIFO | 0o600,
                    rdev: 0,
                    umask: 0,
                    padding: 0,
                }
                .as_slice(),
                &c("fifo"),
            ]),
        ), // node 3
        (Opcode::Open, 3, open(libc::O_RDONLY).as_slice().to_vec()),
        (
            Opcode::Getxattr,
            1,
            cat(&[
                GetxattrIn {
                    size: 64,
                    padding: 0,
                }
                .as_slice(),
                &c("user.x"),
            ]),
        ),
        (
            Opcode::Listxattr,
            1,
            GetxattrIn {
                size: 0,
                padding: 0,
            }
            .as_slice()
            .to_vec(),
        ),
        (
            Opcode::Setxattr,
            1,
            cat(&[
                SetxattrIn { size: 2, flags: 0 }.as_slice(),
                &c("user.x"),
                b"ab",
            ]),
        ),
        (Opcode::Read, 1, read(77, u32::MAX).as_slice().to_vec()),
        (Opcode::Lookup, 1, c("sub")), // node 4
        (Opcode::Lookup, 4, c("up")),  // node 5
        (Opcode::Lookup, 5, c("..")),
    ];
    let forget = vec![
        (
            Opcode::BatchForget,
            0,
            cat(&[
                BatchForgetIn { count: 2, dummy: 0 }.as_slice(),
                ForgetOne {
                    nodeid: 2,
                    nlookup: 1,
                }
                .as_slice(),
                ForgetOne {
                    nodeid: 3,
                    nlookup: 9,
                }
                .as_slice(),
            ]),
        ),
        (
            Opcode::Forget,
            2,
            ForgetIn { nlookup: 1 }.as_slice().to_vec(),
        ),
        (Opcode::Interrupt, 0, 1u64.to_le_bytes().to_vec()),
    ];
    vec![
        image([0x66, 0, 0, 0], &[], &walk),
        image([0x66, 0, 2, 0], &[], &change),
        image([0x66, 0x14, 0, 0], &[], &edges),
        // Read-only, with the harness doing INIT: changes are refused.
        image([0x66, 0x03, 0, 0], &[], &change[1..]),
        // Lookups on the request queue, forgets on hiprio.
        image([0x66, 0x02, 0, 0], &forget, &walk[1..]),
    ]
}

type Request = (fuse_backend_rs::abi::fuse_abi::Opcode, u64, Vec<u8>);

/// Lays requests out the way the Linux driver does: one readable descriptor
/// (header and arguments), one writable (the reply).
fn image(prefix: [u8; PREFIX], hiprio: &[Request], request: &[Request]) -> Vec<u8> {
    use fuse_backend_rs::abi::fuse_abi::InHeader;
    use vm_memory::ByteValued;
    let mut mem = vec![0u8; MEM_SIZE];
    let mut put = |at: u64, bytes: &[u8]| {
        let at = usize::try_from(at).expect("seed address");
        mem[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let mut slot = 0u64;
    let mut unique = 0u64;
    for (reqs, table, avail, with_reply) in [
        (hiprio, HIPRIO_DESC, HIPRIO_AVAIL, false),
        (request, REQ_DESC, REQ_AVAIL, true),
    ] {
        for (i, (op, nodeid, body)) in reqs.iter().enumerate() {
            unique += 1;
            let hdr = InHeader {
                len: tu::small(40 + body.len()),
                opcode: *op as u32,
                unique,
                nodeid: *nodeid,
                uid: 0,
                gid: 0,
                pid: 1,
                padding: 0,
            };
            let at = SEED_BUFS + slot * SEED_SLOT;
            slot += 1;
            put(at, hdr.as_slice());
            put(at + 40, body);
            let d = 2 * i as u64;
            let len: u32 = tu::small(40 + body.len());
            let next = if with_reply { 1u16 } else { 0 };
            put(
                table + 16 * d,
                &desc(
                    at,
                    len,
                    next,
                    u16::try_from(d + 1).expect("seed descriptor"),
                ),
            );
            if with_reply {
                let reply = at + SEED_REPLY;
                put(
                    table + 16 * (d + 1),
                    &desc(
                        reply,
                        u32::try_from(SEED_SLOT - SEED_REPLY).expect("seed reply size"),
                        2,
                        0,
                    ),
                );
            }
            put(
                avail + 4 + 2 * i as u64,
                &u16::try_from(d).expect("seed descriptor").to_le_bytes(),
            );
        }
        put(avail + 2, &tu::small::<u16>(reqs.len()).to_le_bytes());
    }
    fuzz_input(&prefix, &mem)
}
