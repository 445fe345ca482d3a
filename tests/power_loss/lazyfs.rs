//! A FUSE filesystem that loses what was not fsynced, as a machine losing
//! power does (LazyFS's model, which Jepsen uses for the same test).
//!
//! It passes every operation through to a backing directory except file
//! data: writes and truncations are kept in memory, per file, until an
//! `fsync` of that file writes them to the backing file and syncs it. Names
//! (create, mkdir, rename, unlink) reach the backing directory at once, so a
//! file created and never synced survives empty, as on ext4 after a crash.
//! [`LazyFs::power_loss`] drops every unsynced change and fails every later
//! operation with `EIO`; unmounting and mounting again over the same backing
//! directory is the machine coming back.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// Nothing is cached by the kernel: every lookup and size comes from here.
const NO_CACHE: Duration = Duration::ZERO;

/// An unsynced change to a file's data.
enum Change {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

/// A file's unsynced changes, oldest first, and its size with them.
struct Pending {
    size: u64,
    changes: Vec<Change>,
}

/// Where an inode is: its parent and its name there (the root has none).
struct Node {
    parent: u64,
    name: OsString,
}

struct State {
    backing: PathBuf,
    nodes: HashMap<u64, Node>,
    pending: HashMap<u64, Pending>,
    powered_off: bool,
    /// Bytes written and later synced, and bytes dropped by the power loss.
    synced_bytes: u64,
}

/// What the power loss dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dropped {
    /// Files with unsynced changes.
    pub(crate) files: usize,
    /// Bytes written to them and never synced.
    pub(crate) bytes: u64,
    /// Bytes synced before the power loss (how much the store wrote durably).
    pub(crate) synced_bytes: u64,
}

/// A mounted [`LazyFs`]; unmounted when dropped.
pub(crate) struct LazyFs {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl LazyFs {
    /// Mounts a lazy view of `backing` at `mountpoint` (both directories).
    pub(crate) fn mount(backing: &Path, mountpoint: &Path) -> io::Result<LazyFs> {
        fs::create_dir_all(backing)?;
        fs::create_dir_all(mountpoint)?;
        let state = Arc::new(Mutex::new(State {
            backing: backing.to_owned(),
            nodes: HashMap::new(),
            pending: HashMap::new(),
            powered_off: false,
            synced_bytes: 0,
        }));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("bmw-lazyfs".into())];
        config.n_threads = Some(4);
        let filesystem = Lazy {
            state: state.clone(),
        };
        let session = fuser::spawn_mount(filesystem, mountpoint, &config)?;
        Ok(LazyFs {
            state,
            session: Some(session),
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// The power goes: every unsynced change is dropped and every operation
    /// from now on fails with `EIO`.
    pub(crate) fn power_loss(&self) -> Dropped {
        let mut state = self.state.lock().unwrap();
        state.powered_off = true;
        let pending = std::mem::take(&mut state.pending);
        Dropped {
            files: pending.len(),
            bytes: pending
                .values()
                .flat_map(|p| &p.changes)
                .map(|c| match c {
                    Change::Write(_, data) => data.len() as u64,
                    Change::Truncate(_) => 0,
                })
                .sum(),
            synced_bytes: state.synced_bytes,
        }
    }

    /// Unmounts (the processes using it are gone by then).
    /// The kernel sends a file's release to the filesystem after `close`
    /// returns, so a mount whose files were just closed can still be busy
    /// for a moment: the unmount is tried again for up to 10 s.
    pub(crate) fn unmount(mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .map_err(io::Error::other)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: `path` is a valid NUL-terminated string for the call.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                break;
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EBUSY) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Not mounted any more (fuser's own unmount below says so).
                Some(libc::EINVAL) => break,
                _ => return Err(error),
            }
        }
        // Unmounted: the session's thread ends; its own unmount finds nothing.
        session.join()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

/// The filesystem the FUSE session serves.
struct Lazy {
    state: Arc<Mutex<State>>,
}

type Result<T> = std::result::Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

impl State {
    /// The backing path of inode `ino`.
    fn path(&self, ino: u64) -> Result<PathBuf> {
        let mut names = Vec::new();
        let mut at = ino;
        while at != INodeNo::ROOT.0 {
            let node = self.nodes.get(&at).ok_or(Errno::ENOENT)?;
            names.push(node.name.clone());
            at = node.parent;
        }
        let mut path = self.backing.clone();
        path.extend(names.iter().rev());
        Ok(path)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf> {
        Ok(self.path(parent)?.join(name))
    }

    /// The inode number of a backing file: its own (the root's is 1).
    fn remember(&mut self, parent: u64, name: &OsStr, meta: &fs::Metadata) -> u64 {
        let ino = meta.ino();
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_owned(),
            },
        );
        ino
    }

    fn attr(&self, ino: u64, meta: &fs::Metadata) -> FileAttr {
        let time = |secs: i64, nanos: i64| {
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
        };
        let kind = if meta.is_dir() {
            FileType::Directory
        } else if meta.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        let size = self.pending.get(&ino).map_or(meta.len(), |p| p.size);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: u64) -> Result<FileAttr> {
        let meta = fs::symlink_metadata(self.path(ino)?).map_err(errno)?;
        Ok(self.attr(ino, &meta))
    }

    /// The file's pending changes, started from its backing size.
    fn pending_of(&mut self, ino: u64) -> Result<&mut Pending> {
        if !self.pending.contains_key(&ino) {
            let size = fs::metadata(self.path(ino)?).map_err(errno)?.len();
            self.pending.insert(
                ino,
                Pending {
                    size,
                    changes: Vec::new(),
                },
            );
        }
        Ok(self.pending.get_mut(&ino).expect("inserted"))
    }

    /// `size` bytes at `offset` as the file reads now: the backing file with
    /// the pending changes over it.
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let file = fs::File::open(self.path(ino)?).map_err(errno)?;
        let logical = self
            .pending
            .get(&ino)
            .map_or_else(|| file.metadata().map(|m| m.len()), |p| Ok(p.size))
            .map_err(errno)?;
        let end = logical.min(offset + u64::from(size));
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut buf = vec![0; (end - offset) as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(errno(e)),
            }
        }
        let Some(pending) = self.pending.get(&ino) else {
            return Ok(buf);
        };
        for change in &pending.changes {
            match change {
                Change::Write(at, data) => {
                    let (from, to) = ((*at).max(offset), (at + data.len() as u64).min(end));
                    if from < to {
                        buf[(from - offset) as usize..(to - offset) as usize]
                            .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
                    }
                }
                Change::Truncate(len) if *len < end => {
                    let from = (*len).max(offset);
                    buf[(from - offset) as usize..].fill(0);
                }
                Change::Truncate(_) => {}
            }
        }
        Ok(buf)
    }

    /// Writes the file's pending changes to its backing file and syncs it.
    fn sync(&mut self, ino: u64) -> Result<()> {
        let Some(pending) = self.pending.remove(&ino) else {
            return Ok(());
        };
        let path = self.path(ino)?;
        let file = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(errno)?;
        for change in &pending.changes {
            match change {
                Change::Write(at, data) => {
                    file.write_all_at(data, *at).map_err(errno)?;
                    self.synced_bytes += data.len() as u64;
                }
                Change::Truncate(len) => file.set_len(*len).map_err(errno)?,
            }
        }
        file.sync_all().map_err(errno)
    }
}

impl Lazy {
    /// The state, or `EIO` once the power is off.
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.state.lock().unwrap();
        if state.powered_off {
            return Err(Errno::EIO);
        }
        Ok(state)
    }

    fn entry(&self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        let mut state = self.state()?;
        let meta = fs::symlink_metadata(state.child(parent, name)?).map_err(errno)?;
        let ino = state.remember(parent, name, &meta);
        Ok(state.attr(ino, &meta))
    }
}

macro_rules! reply {
    ($reply:expr, $result:expr, |$ok:pat_param| $on_ok:expr) => {
        match $result {
            Ok($ok) => $on_ok,
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for Lazy {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply!(reply, self.entry(parent.0, name), |attr| reply.entry(
            &NO_CACHE,
            &attr,
            Generation(0)
        ));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let attr = self.state().and_then(|s| s.attr_of(ino.0));
        reply!(reply, attr, |attr| reply.attr(&NO_CACHE, &attr));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            let mut state = self.state()?;
            if let Some(mode) = mode {
                fs::set_permissions(state.path(ino.0)?, fs::Permissions::from_mode(mode))
                    .map_err(errno)?;
            }
            if let Some(size) = size {
                let pending = state.pending_of(ino.0)?;
                pending.size = size;
                pending.changes.push(Change::Truncate(size));
            }
            state.attr_of(ino.0)
        })();
        reply!(reply, result, |attr| reply.attr(&NO_CACHE, &attr));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            let path = self.state()?.child(parent.0, name)?;
            fs::create_dir(&path).map_err(errno)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
            self.entry(parent.0, name)
        })();
        reply!(reply, result, |attr| reply.entry(
            &NO_CACHE,
            &attr,
            Generation(0)
        ));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = (|| {
            let mut state = self.state()?;
            let path = state.child(parent.0, name)?;
            let ino = fs::symlink_metadata(&path).map_err(errno)?.ino();
            fs::remove_file(&path).map_err(errno)?;
            state.pending.remove(&ino);
            state.nodes.remove(&ino);
            Ok(())
        })();
        reply!(reply, result, |()| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = (|| {
            let mut state = self.state()?;
            let path = state.child(parent.0, name)?;
            let ino = fs::symlink_metadata(&path).map_err(errno)?.ino();
            fs::remove_dir(&path).map_err(errno)?;
            state.nodes.remove(&ino);
            Ok(())
        })();
        reply!(reply, result, |()| reply.ok());
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let mut state = self.state()?;
            let from = state.child(parent.0, name)?;
            let to = state.child(newparent.0, newname)?;
            let ino = fs::symlink_metadata(&from).map_err(errno)?.ino();
            if let Ok(replaced) = fs::symlink_metadata(&to) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                state.pending.remove(&replaced.ino());
                state.nodes.remove(&replaced.ino());
            }
            fs::rename(&from, &to).map_err(errno)?;
            state.nodes.insert(
                ino,
                Node {
                    parent: newparent.0,
                    name: newname.to_owned(),
                },
            );
            Ok(())
        })();
        reply!(reply, result, |()| reply.ok());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.state().and_then(|s| s.attr_of(ino.0));
        reply!(reply, result, |_| reply
            .opened(FileHandle(0), FopenFlags::empty()));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            let path = self.state()?.child(parent.0, name)?;
            let mut options = fs::OpenOptions::new();
            options.write(true).create(true);
            if flags & libc::O_EXCL != 0 {
                options.create_new(true);
            }
            let file = options.open(&path).map_err(errno)?;
            file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
                .map_err(errno)?;
            let attr = self.entry(parent.0, name)?;
            if flags & libc::O_TRUNC != 0 {
                let mut state = self.state()?;
                let pending = state.pending_of(attr.ino.0)?;
                pending.size = 0;
                pending.changes.push(Change::Truncate(0));
                return state.attr_of(attr.ino.0);
            }
            Ok(attr)
        })();
        reply!(reply, result, |attr| reply.created(
            &NO_CACHE,
            &attr,
            Generation(0),
            FileHandle(0),
            FopenFlags::empty()
        ));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let data = self.state().and_then(|s| s.read(ino.0, offset, size));
        reply!(reply, data, |data| reply.data(&data));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = (|| {
            let mut state = self.state()?;
            let pending = state.pending_of(ino.0)?;
            pending.size = pending.size.max(offset + data.len() as u64);
            pending.changes.push(Change::Write(offset, data.to_vec()));
            Ok(data.len() as u32)
        })();
        reply!(reply, result, |n| reply.written(n));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Closing a file does not put it on disk.
        reply!(reply, self.state(), |_| reply.ok());
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.state().and_then(|mut s| s.sync(ino.0));
        reply!(reply, result, |()| reply.ok());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = (|| {
            let mut state = self.state()?;
            let path = state.path(ino.0)?;
            let parent = state.nodes.get(&ino.0).map_or(ino.0, |n| n.parent);
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (parent, FileType::Directory, OsString::from("..")),
            ];
            for entry in fs::read_dir(&path).map_err(errno)? {
                let entry = entry.map_err(errno)?;
                let meta = entry.metadata().map_err(errno)?;
                let child = state.remember(ino.0, &entry.file_name(), &meta);
                let kind = if meta.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                entries.push((child, kind, entry.file_name()));
            }
            Ok(entries)
        })();
        let entries = match result {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names reach the backing directory at once: nothing to sync.
        reply!(reply, self.state(), |_| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let result = (|| {
            let backing = self.state()?.backing.clone();
            let path = std::ffi::CString::new(backing.as_os_str().as_encoded_bytes())
                .map_err(|_| Errno::EINVAL)?;
            let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: a valid C string and a zeroed struct for the kernel to fill.
            if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
                return Err(errno(io::Error::last_os_error()));
            }
            Ok(stat)
        })();
        reply!(reply, result, |s| reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32
        ));
    }
}
