//! The policy layer between the FUSE server and `PassthroughFs`: what the
//! passthrough file system would allow but husk does not.
//!
//! - A read-only share refuses every request that changes it (EROFS).
//! - Device nodes other than overlayfs whiteouts (char 0:0) cannot be created:
//!   the guest can use them in its own kernel without our help, and on the
//!   host they would be real devices any host process could open.
//! - The host file descriptors the guest can make the VMM hold (one per
//!   inode the guest remembers, one per open file) are capped, because they
//!   come out of the shim process's descriptor table.
//! - Sizes the guest names that `PassthroughFs` would allocate up front
//!   (getxattr/listxattr/readdir buffers) are clamped to what Linux can use.
//! - With close-to-open caching, an open keeps the guest's cached pages of a
//!   file (FOPEN_KEEP_CACHE) when the host file is as it was at the guest's
//!   previous open of it (size, mtime and ctime to the nanosecond), and drops
//!   them otherwise: the check NFS makes at open, done here because the
//!   host, not the guest, sees the file change. Without it every open
//!   throws away what the guest read, and every exec of a binary reads it
//!   from the host again.
//!
//! Every method `PassthroughFs` implements is forwarded explicitly; the ones
//! it does not implement keep the trait's default (ENOSYS), so a method this
//! layer forgets to forward fails closed.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};

/// Largest xattr value and name list Linux supports (XATTR_SIZE_MAX, XATTR_LIST_MAX).
const XATTR_MAX: u32 = 64 * 1024;
/// Largest readdir buffer worth reading from the host in one request: the
/// FUSE server's own request size limit (1 MiB, MAX_BUFFER_SIZE).
const READDIR_MAX: u32 = 1 << 20;

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Host descriptors held on the guest's behalf.
#[derive(Default)]
struct Budget {
    /// Lookup count per inode the guest knows (the root is not counted: its
    /// descriptor exists from FUSE_INIT on, whatever the guest does).
    inodes: HashMap<u64, u64>,
    /// Open file and directory handles.
    handles: HashSet<u64>,
    /// The host file as the guest's last open of it saw it, per inode the
    /// guest knows (dropped with the inode: bounded like `inodes`).
    opened_as: HashMap<u64, FileVersion>,
}

/// What tells a changed host file from an unchanged one at open. ctime
/// moves on every write and metadata change and cannot be set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(st: &stat64) -> Self {
        Self {
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

impl Budget {
    fn used(&self) -> u64 {
        (self.inodes.len() + self.handles.len()) as u64
    }

    fn knows(&self, inode: u64) -> bool {
        inode == ROOT_ID || inode == 0 || self.inodes.contains_key(&inode)
    }

    fn add_lookup(&mut self, inode: u64) {
        if inode != ROOT_ID && inode != 0 {
            *self.inodes.entry(inode).or_insert(0) += 1;
        }
    }

    fn forget(&mut self, inode: u64, count: u64) {
        if let Some(n) = self.inodes.get_mut(&inode) {
            // A guest forgetting more than it looked up cannot drive the count
            // below what PassthroughFs still holds: it saturates at zero too.
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.inodes.remove(&inode);
                // The guest drops an inode's cached pages with the inode.
                self.opened_as.remove(&inode);
            }
        }
    }
}

/// `inner` with husk's policy applied (see the module docs).
pub struct GuardedFs<F> {
    inner: F,
    read_only: bool,
    max_fds: u64,
    /// Keep cached pages of files unchanged since the guest's last open
    /// (close-to-open caching; see the module docs).
    keep_unchanged: bool,
    budget: Mutex<Budget>,
}

impl<F> GuardedFs<F>
where
    F: FileSystem<Inode = u64, Handle = u64>,
{
    pub fn new(inner: F, read_only: bool, max_fds: u64, keep_unchanged: bool) -> Self {
        Self {
            inner,
            read_only,
            max_fds,
            keep_unchanged,
            budget: Mutex::new(Budget::default()),
        }
    }

    fn budget(&self) -> MutexGuard<'_, Budget> {
        // Nothing panics while holding the lock; if something did, the counts
        // are still the best information there is.
        self.budget.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Host descriptors currently held for the guest (inodes + handles).
    pub fn fds_in_use(&self) -> u64 {
        self.budget().used()
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Refuses an operation that needs `n` more descriptors than the budget has.
    fn reserve(&self, n: u64) -> io::Result<()> {
        if self.budget().used() + n > self.max_fds {
            Err(err(libc::ENFILE))
        } else {
            Ok(())
        }
    }

    /// Counts an entry the guest now holds a reference to.
    fn entry(&self, entry: io::Result<Entry>) -> io::Result<Entry> {
        let entry = entry?;
        self.budget().add_lookup(entry.inode);
        Ok(entry)
    }

    fn handle(&self, handle: Option<u64>) {
        if let Some(h) = handle {
            self.budget().handles.insert(h);
        }
    }

    /// Whether the host file behind `inode` is as the guest's previous open
    /// of it saw it; remembers how this open sees it. Anything unknown (a
    /// first open, an inode the guest forgot, a failed stat) is a change.
    fn unchanged_since_last_open(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> bool {
        let now = self
            .inner
            .getattr(ctx, inode, handle)
            .ok()
            .map(|(st, _)| FileVersion::of(&st));
        let mut budget = self.budget();
        if !budget.inodes.contains_key(&inode) {
            return false;
        }
        let before = match now {
            Some(version) => budget.opened_as.insert(inode, version),
            None => budget.opened_as.remove(&inode).and(None),
        };
        now.is_some() && before == now
    }
}

impl<F> FileSystem for GuardedFs<F>
where
    F: FileSystem<Inode = u64, Handle = u64>,
{
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = self.inner.init(capable)?;
        // PassthroughFs asks only for what it implements itself; these are
        // about the protocol and cost it nothing (fuse-backend-rs's Vfs asks
        // for the same). Without BIG_WRITES and MAX_PAGES every write would
        // be cut into 4 KiB requests.
        want |= FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ASYNC_DIO
            | FsOptions::ATOMIC_O_TRUNC
            // Cached data is dropped when the host's mtime changes: what
            // makes the `auto` policy coherent with host-side writes.
            | FsOptions::AUTO_INVAL_DATA;
        if self.read_only {
            // Nothing would be written back.
            want.remove(FsOptions::WRITEBACK_CACHE);
        }
        Ok(want)
    }

    fn destroy(&self) {
        self.inner.destroy();
        // PassthroughFs dropped every inode and handle.
        *self.budget() = Budget::default();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name)?;
        let mut budget = self.budget();
        if !budget.knows(entry.inode) && budget.used() >= self.max_fds {
            drop(budget);
            // A new inode over budget: give back the reference (and with it
            // the descriptor) PassthroughFs just took.
            self.inner.forget(ctx, entry.inode, 1);
            return Err(err(libc::ENFILE));
        }
        budget.add_lookup(entry.inode);
        Ok(entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.budget().forget(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        {
            let mut budget = self.budget();
            for &(inode, count) in &requests {
                budget.forget(inode, count);
            }
        }
        self.inner.batch_forget(ctx, requests);
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.reserve(1)?;
        self.entry(self.inner.symlink(ctx, linkname, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        match mode & libc::S_IFMT {
            libc::S_IFBLK => return Err(err(libc::EPERM)),
            libc::S_IFCHR if rdev != 0 => return Err(err(libc::EPERM)),
            _ => {}
        }
        self.reserve(1)?;
        self.entry(self.inner.mknod(ctx, parent, name, mode, rdev, umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.reserve(1)?;
        self.entry(self.inner.mkdir(ctx, parent, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        self.reserve(1)?;
        self.entry(self.inner.link(ctx, inode, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if self.read_only {
            // open(2)'s flags as the C int they are (the same bits).
            let f = i32::from_ne_bytes(flags.to_ne_bytes());
            // O_TMPFILE includes O_DIRECTORY; its own bit is what creates a file.
            let tmpfile = libc::O_TMPFILE & !libc::O_DIRECTORY;
            if f & libc::O_ACCMODE != libc::O_RDONLY
                || f & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND | tmpfile) != 0
            {
                return Err(err(libc::EROFS));
            }
        }
        self.reserve(1)?;
        let (handle, mut options, passthrough) = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.handle(handle);
        if self.keep_unchanged && self.unchanged_since_last_open(ctx, inode, handle) {
            options |= OpenOptions::KEEP_CACHE;
        }
        Ok((handle, options, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        self.reserve(2)?;
        let created = self.inner.create(ctx, parent, name, args)?;
        self.budget().add_lookup(created.0.inode);
        self.handle(created.1);
        Ok(created)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        // No allocation here: the data goes straight into the guest's buffers,
        // whose size the writer checks.
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        // Handles are opened read-only on a read-only share, so the host
        // would refuse too; say so before touching the file.
        self.writable()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.budget().handles.remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        // PassthroughFs allocates `size` bytes before asking the host.
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.reserve(1)?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.handle(opened.0);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // PassthroughFs allocates `size` bytes for getdents; the server stops
        // adding entries at the guest's `size` anyway.
        self.inner
            .readdir(ctx, inode, handle, size.min(READDIR_MAX), offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut added = 0usize;
        let mut refused = false;
        let mut counted = |d: DirEntry, e: Entry| -> io::Result<usize> {
            {
                let budget = self.budget();
                if !budget.knows(e.inode) && budget.used() >= self.max_fds {
                    // "No room" makes PassthroughFs drop the reference it took
                    // and stop; an error would leak it.
                    refused = true;
                    return Ok(0);
                }
            }
            let n = add_entry(d, e)?;
            if n > 0 {
                self.budget().add_lookup(e.inode);
                added += 1;
            }
            Ok(n)
        };
        self.inner.readdirplus(
            ctx,
            inode,
            handle,
            size.min(READDIR_MAX),
            offset,
            &mut counted,
        )?;
        if refused && added == 0 {
            // An empty reply would read as the end of the directory.
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.budget().handles.remove(&handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.read_only && mask & libc::W_OK as u32 != 0 {
            return Err(err(libc::EROFS));
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}
