//! The libvirt C API, loaded at run time (`libvirt.so.0`, and
//! `libvirt-qemu.so.0` for QMP queries), and wrapped in owned handles. The
//! only `unsafe` code of blockgate lives here. Every function pointer is
//! declared by hand from libvirt's headers (`libvirt-host.h`,
//! `libvirt-domain.h`, `libvirt-domain-checkpoint.h`, `virterror.h`,
//! `libvirt-qemu.h`): all of them take and return pointers, `int` and
//! `unsigned int`, and every one has been in libvirt since 6.10 or
//! earlier. Loaded rather than linked, so one binary runs on hosts with
//! and without libvirt, and builds on machines without `libvirt-dev`.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

use crate::Error;

type Handle = *mut c_void;

/// The symbols blockgate calls, and the libraries that hold them (never
/// unloaded: the symbols stay valid for the life of the process).
struct Api {
    _libvirt: libloading::Library,
    _libvirt_qemu: Option<libloading::Library>,
    connect_open: unsafe extern "C" fn(*const c_char) -> Handle,
    connect_close: unsafe extern "C" fn(Handle) -> c_int,
    connect_lib_version: unsafe extern "C" fn(Handle, *mut std::ffi::c_ulong) -> c_int,
    list_all_domains: unsafe extern "C" fn(Handle, *mut *mut Handle, c_uint) -> c_int,
    lookup_by_name: unsafe extern "C" fn(Handle, *const c_char) -> Handle,
    domain_free: unsafe extern "C" fn(Handle) -> c_int,
    domain_name: unsafe extern "C" fn(Handle) -> *const c_char,
    domain_uuid_string: unsafe extern "C" fn(Handle, *mut c_char) -> c_int,
    domain_state: unsafe extern "C" fn(Handle, *mut c_int, *mut c_int, c_uint) -> c_int,
    domain_xml: unsafe extern "C" fn(Handle, c_uint) -> *mut c_char,
    block_info: unsafe extern "C" fn(Handle, *const c_char, *mut BlockInfo, c_uint) -> c_int,
    list_checkpoints: unsafe extern "C" fn(Handle, *mut *mut Handle, c_uint) -> c_int,
    checkpoint_xml: unsafe extern "C" fn(Handle, c_uint) -> *mut c_char,
    checkpoint_lookup: unsafe extern "C" fn(Handle, *const c_char, c_uint) -> Handle,
    checkpoint_delete: unsafe extern "C" fn(Handle, c_uint) -> c_int,
    checkpoint_free: unsafe extern "C" fn(Handle) -> c_int,
    backup_begin: unsafe extern "C" fn(Handle, *const c_char, *const c_char, c_uint) -> c_int,
    backup_xml: unsafe extern "C" fn(Handle, c_uint) -> *mut c_char,
    abort_job: unsafe extern "C" fn(Handle) -> c_int,
    fs_freeze: unsafe extern "C" fn(Handle, *const *const c_char, c_uint, c_uint) -> c_int,
    fs_thaw: unsafe extern "C" fn(Handle, *const *const c_char, c_uint, c_uint) -> c_int,
    last_error_code: unsafe extern "C" fn() -> c_int,
    last_error_message: unsafe extern "C" fn() -> *const c_char,
    monitor_command: Option<unsafe extern "C" fn(Handle, *const c_char, *mut *mut c_char, c_uint) -> c_int>,
}

/// `virDomainBlockInfo`: three `unsigned long long`.
#[repr(C)]
#[derive(Default)]
struct BlockInfo {
    capacity: u64,
    allocation: u64,
    physical: u64,
}

/// An error handler that prints nothing: libvirt's default one writes
/// every error to stderr, and ours are reported through [`Error`].
extern "C" fn ignore_error(_user_data: *mut c_void, _error: *mut c_void) {}

/// Looks a symbol up as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the symbol's C signature.
unsafe fn symbol<T: Copy>(library: &libloading::Library, name: &str) -> Result<T, String> {
    let name_nul = format!("{name}\0");
    // SAFETY: the caller vouches for `T`; the pointer is copied out and
    // stays valid because the library is never unloaded.
    unsafe { library.get::<T>(name_nul.as_bytes()).map(|symbol| *symbol).map_err(|error| format!("{name}: {error}")) }
}

impl Api {
    fn load() -> Result<Api, String> {
        // SAFETY: loading libvirt runs its ELF initializers, which only set
        // up its own global state.
        let libvirt = unsafe { libloading::Library::new("libvirt.so.0") }
            .map_err(|error| format!("cannot load libvirt.so.0 ({error}); install libvirt0 (Debian) or libvirt-libs"))?;
        // SAFETY: as above, for libvirt's QEMU-specific library.
        let libvirt_qemu = unsafe { libloading::Library::new("libvirt-qemu.so.0") }.ok();
        // SAFETY: each signature below is copied from libvirt's headers.
        unsafe {
            let initialize: unsafe extern "C" fn() -> c_int = symbol(&libvirt, "virInitialize")?;
            let set_error_func: unsafe extern "C" fn(*mut c_void, extern "C" fn(*mut c_void, *mut c_void)) =
                symbol(&libvirt, "virSetErrorFunc")?;
            if initialize() < 0 {
                return Err("virInitialize failed".into());
            }
            set_error_func(ptr::null_mut(), ignore_error);
            let monitor_command = match &libvirt_qemu {
                Some(library) => symbol(library, "virDomainQemuMonitorCommand").ok(),
                None => None,
            };
            Ok(Api {
                connect_open: symbol(&libvirt, "virConnectOpen")?,
                connect_close: symbol(&libvirt, "virConnectClose")?,
                connect_lib_version: symbol(&libvirt, "virConnectGetLibVersion")?,
                list_all_domains: symbol(&libvirt, "virConnectListAllDomains")?,
                lookup_by_name: symbol(&libvirt, "virDomainLookupByName")?,
                domain_free: symbol(&libvirt, "virDomainFree")?,
                domain_name: symbol(&libvirt, "virDomainGetName")?,
                domain_uuid_string: symbol(&libvirt, "virDomainGetUUIDString")?,
                domain_state: symbol(&libvirt, "virDomainGetState")?,
                domain_xml: symbol(&libvirt, "virDomainGetXMLDesc")?,
                block_info: symbol(&libvirt, "virDomainGetBlockInfo")?,
                list_checkpoints: symbol(&libvirt, "virDomainListAllCheckpoints")?,
                checkpoint_xml: symbol(&libvirt, "virDomainCheckpointGetXMLDesc")?,
                checkpoint_lookup: symbol(&libvirt, "virDomainCheckpointLookupByName")?,
                checkpoint_delete: symbol(&libvirt, "virDomainCheckpointDelete")?,
                checkpoint_free: symbol(&libvirt, "virDomainCheckpointFree")?,
                backup_begin: symbol(&libvirt, "virDomainBackupBegin")?,
                backup_xml: symbol(&libvirt, "virDomainBackupGetXMLDesc")?,
                abort_job: symbol(&libvirt, "virDomainAbortJob")?,
                fs_freeze: symbol(&libvirt, "virDomainFSFreeze")?,
                fs_thaw: symbol(&libvirt, "virDomainFSThaw")?,
                last_error_code: symbol(&libvirt, "virGetLastErrorCode")?,
                last_error_message: symbol(&libvirt, "virGetLastErrorMessage")?,
                monitor_command,
                _libvirt: libvirt,
                _libvirt_qemu: libvirt_qemu,
            })
        }
    }
}

/// libvirt's API, loaded on first use.
fn api() -> Result<&'static Api, Error> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::load).as_ref().map_err(|why| Error::unavailable(why.clone()))
}

/// The error of the call that just failed on this thread (libvirt keeps
/// it per thread).
fn last_error(api: &Api) -> Error {
    // SAFETY: both take no arguments; the message is a NUL-terminated
    // string owned by libvirt's thread-local error, copied out at once.
    let (code, message) = unsafe {
        let message = (api.last_error_message)();
        let message =
            if message.is_null() { "unknown libvirt error".into() } else { CStr::from_ptr(message).to_string_lossy().into_owned() };
        ((api.last_error_code)(), message)
    };
    Error { code, message }
}

/// A C string argument.
fn c_string(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error { code: crate::code::INVALID_ARG, message: format!("{text:?} holds a NUL byte") })
}

/// Takes a string libvirt allocated for us (`char *`), freeing it.
///
/// # Safety
/// `text` must be null or a NUL-terminated string from `malloc`.
unsafe fn take_string(api: &Api, text: *mut c_char) -> Result<String, Error> {
    if text.is_null() {
        return Err(last_error(api));
    }
    // SAFETY: per the caller, a valid C string that we own.
    unsafe {
        let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
        libc::free(text.cast());
        Ok(owned)
    }
}

/// Takes an array of handles libvirt allocated (`T **`) with `count`
/// entries, wrapping each entry with `wrap` and freeing the array.
///
/// # Safety
/// `array` must hold `count` valid handles we own, allocated by `malloc`.
unsafe fn take_handles<T>(array: *mut Handle, count: c_int, wrap: impl Fn(NonNull<c_void>) -> T) -> Vec<T> {
    let count = usize::try_from(count).unwrap_or(0);
    let mut handles = Vec::with_capacity(count);
    // SAFETY: per the caller.
    unsafe {
        for index in 0..count {
            if let Some(handle) = NonNull::new(*array.add(index)) {
                handles.push(wrap(handle));
            }
        }
        libc::free(array.cast());
    }
    handles
}

/// A connection to libvirtd.
pub struct Connection {
    handle: NonNull<c_void>,
    api: &'static Api,
}

// SAFETY: libvirt's connections may be used from any thread and by several
// threads at once (libvirt is thread-safe since 0.6, per connection).
unsafe impl Send for Connection {}
// SAFETY: as for Send.
unsafe impl Sync for Connection {}

impl Connection {
    /// Opens `uri` (e.g. `qemu:///system`) read-write.
    pub fn open(uri: &str) -> Result<Connection, Error> {
        let api = api()?;
        let uri = c_string(uri)?;
        // SAFETY: a valid C string; a null result is an error.
        let handle = unsafe { (api.connect_open)(uri.as_ptr()) };
        NonNull::new(handle).map(|handle| Connection { handle, api }).ok_or_else(|| last_error(api))
    }

    /// True if libvirtd answers on this connection now: one round trip
    /// (`virConnectIsAlive` cannot tell without an event loop, and a
    /// libvirtd restart breaks the connection silently).
    pub fn answers(&self) -> bool {
        let mut version: std::ffi::c_ulong = 0;
        // SAFETY: a live handle and an out pointer.
        unsafe { (self.api.connect_lib_version)(self.handle.as_ptr(), &mut version) == 0 }
    }

    /// Every domain libvirt knows (running or not).
    pub fn domains(&self) -> Result<Vec<Domain>, Error> {
        let mut array: *mut Handle = ptr::null_mut();
        // SAFETY: a live handle and an out pointer; flags 0 lists all.
        let count = unsafe { (self.api.list_all_domains)(self.handle.as_ptr(), &mut array, 0) };
        if count < 0 {
            return Err(last_error(self.api));
        }
        // SAFETY: libvirt returned `count` domains in a malloc'd array.
        Ok(unsafe { take_handles(array, count, |handle| Domain { handle, api: self.api }) })
    }

    /// The domain named `name`.
    pub fn domain(&self, name: &str) -> Result<Domain, Error> {
        let name = c_string(name)?;
        // SAFETY: a live handle and a valid C string.
        let handle = unsafe { (self.api.lookup_by_name)(self.handle.as_ptr(), name.as_ptr()) };
        NonNull::new(handle).map(|handle| Domain { handle, api: self.api }).ok_or_else(|| last_error(self.api))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: our reference, released once.
        unsafe { (self.api.connect_close)(self.handle.as_ptr()) };
    }
}

/// A domain (a VM).
pub struct Domain {
    handle: NonNull<c_void>,
    api: &'static Api,
}

// SAFETY: domain handles are reference-counted and thread-safe in libvirt.
unsafe impl Send for Domain {}
// SAFETY: as for Send.
unsafe impl Sync for Domain {}

impl Domain {
    /// Runs a call that returns an `int`, negative on failure.
    fn check(&self, result: c_int) -> Result<c_int, Error> {
        if result < 0 { Err(last_error(self.api)) } else { Ok(result) }
    }

    /// The domain's name.
    pub fn name(&self) -> String {
        // SAFETY: a live handle; the name is owned by the handle and
        // copied out at once.
        unsafe {
            let name = (self.api.domain_name)(self.handle.as_ptr());
            if name.is_null() { String::new() } else { CStr::from_ptr(name).to_string_lossy().into_owned() }
        }
    }

    /// The domain's UUID, in its usual text form.
    pub fn uuid(&self) -> Result<String, Error> {
        // VIR_UUID_STRING_BUFLEN is 37.
        let mut buffer = [0 as c_char; 37];
        // SAFETY: a live handle and a buffer of the size libvirt writes.
        self.check(unsafe { (self.api.domain_uuid_string)(self.handle.as_ptr(), buffer.as_mut_ptr()) })?;
        // SAFETY: libvirt wrote a NUL-terminated string into the buffer.
        Ok(unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// The domain's state (`virDomainState`: 1 running, 3 paused, 5 shut
    /// off...).
    pub fn state(&self) -> Result<i32, Error> {
        let (mut state, mut reason) = (0, 0);
        // SAFETY: a live handle and two out pointers.
        self.check(unsafe { (self.api.domain_state)(self.handle.as_ptr(), &mut state, &mut reason, 0) })?;
        Ok(state)
    }

    /// The live domain XML.
    pub fn xml(&self) -> Result<String, Error> {
        // SAFETY: a live handle; the result is a malloc'd string or null.
        unsafe { take_string(self.api, (self.api.domain_xml)(self.handle.as_ptr(), 0)) }
    }

    /// The size of disk `target` (e.g. `vda`) as the guest sees it.
    pub fn disk_size(&self, target: &str) -> Result<u64, Error> {
        let target = c_string(target)?;
        let mut info = BlockInfo::default();
        // SAFETY: a live handle, a valid C string and a struct of the
        // layout libvirt fills.
        self.check(unsafe { (self.api.block_info)(self.handle.as_ptr(), target.as_ptr(), &mut info, 0) })?;
        Ok(info.capacity)
    }

    /// The XML of every checkpoint, parents before children.
    pub fn checkpoints(&self) -> Result<Vec<String>, Error> {
        const TOPOLOGICAL: c_uint = 1 << 1;
        let mut array: *mut Handle = ptr::null_mut();
        // SAFETY: a live handle and an out pointer.
        let count = self.check(unsafe { (self.api.list_checkpoints)(self.handle.as_ptr(), &mut array, TOPOLOGICAL) })?;
        // SAFETY: libvirt returned `count` checkpoints in a malloc'd array.
        let checkpoints = unsafe { take_handles(array, count, |handle| Checkpoint { handle, api: self.api }) };
        checkpoints.iter().map(Checkpoint::xml).collect()
    }

    /// Deletes checkpoint `name` (libvirt merges its bitmaps into its
    /// parent's); with `metadata_only`, only libvirt's record of it.
    pub fn delete_checkpoint(&self, name: &str, metadata_only: bool) -> Result<(), Error> {
        const METADATA_ONLY: c_uint = 1 << 1;
        let name = c_string(name)?;
        // SAFETY: a live handle and a valid C string.
        let handle = unsafe { (self.api.checkpoint_lookup)(self.handle.as_ptr(), name.as_ptr(), 0) };
        let checkpoint = NonNull::new(handle).map(|handle| Checkpoint { handle, api: self.api }).ok_or_else(|| last_error(self.api))?;
        // SAFETY: a live checkpoint handle.
        self.check(unsafe { (self.api.checkpoint_delete)(checkpoint.handle.as_ptr(), if metadata_only { METADATA_ONLY } else { 0 }) })?;
        Ok(())
    }

    /// Starts a backup job; a checkpoint given is made with it, atomically.
    pub fn begin_backup(&self, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<(), Error> {
        let backup_xml = c_string(backup_xml)?;
        let checkpoint_xml = checkpoint_xml.map(c_string).transpose()?;
        let checkpoint_ptr = checkpoint_xml.as_ref().map_or(ptr::null(), |xml| xml.as_ptr());
        // SAFETY: a live handle and valid C strings (or null).
        self.check(unsafe { (self.api.backup_begin)(self.handle.as_ptr(), backup_xml.as_ptr(), checkpoint_ptr, 0) })?;
        Ok(())
    }

    /// The running backup job's XML (an error when none runs).
    pub fn backup_xml(&self) -> Result<String, Error> {
        // SAFETY: a live handle; the result is a malloc'd string or null.
        unsafe { take_string(self.api, (self.api.backup_xml)(self.handle.as_ptr(), 0)) }
    }

    /// Ends the domain's running job.
    pub fn abort_job(&self) -> Result<(), Error> {
        // SAFETY: a live handle.
        self.check(unsafe { (self.api.abort_job)(self.handle.as_ptr()) })?;
        Ok(())
    }

    /// Freezes the guest's file systems through its agent; returns how
    /// many were frozen.
    pub fn freeze_filesystems(&self) -> Result<i32, Error> {
        // SAFETY: a live handle; no mount points means all of them.
        self.check(unsafe { (self.api.fs_freeze)(self.handle.as_ptr(), ptr::null(), 0, 0) })
    }

    /// Thaws what [`Domain::freeze_filesystems`] froze.
    pub fn thaw_filesystems(&self) -> Result<i32, Error> {
        // SAFETY: a live handle; no mount points means all of them.
        self.check(unsafe { (self.api.fs_thaw)(self.handle.as_ptr(), ptr::null(), 0, 0) })
    }

    /// Runs a QMP command on the domain's qemu and returns its reply.
    pub fn qmp(&self, command: &str) -> Result<String, Error> {
        let Some(monitor_command) = self.api.monitor_command else {
            return Err(Error::unavailable("libvirt-qemu.so.0 is missing; install libvirt0".into()));
        };
        let command = c_string(command)?;
        let mut reply: *mut c_char = ptr::null_mut();
        // SAFETY: a live handle, a valid C string and an out pointer;
        // flags 0 means the command is QMP.
        self.check(unsafe { monitor_command(self.handle.as_ptr(), command.as_ptr(), &mut reply, 0) })?;
        // SAFETY: on success the reply is a malloc'd string.
        unsafe { take_string(self.api, reply) }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: our reference, released once.
        unsafe { (self.api.domain_free)(self.handle.as_ptr()) };
    }
}

/// A checkpoint handle, alive only inside this module.
struct Checkpoint {
    handle: NonNull<c_void>,
    api: &'static Api,
}

impl Checkpoint {
    /// The checkpoint's XML, without the copy of the domain's XML.
    fn xml(&self) -> Result<String, Error> {
        const NO_DOMAIN: c_uint = 1 << 1;
        // SAFETY: a live handle; the result is a malloc'd string or null.
        unsafe { take_string(self.api, (self.api.checkpoint_xml)(self.handle.as_ptr(), NO_DOMAIN)) }
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: our reference, released once.
        unsafe { (self.api.checkpoint_free)(self.handle.as_ptr()) };
    }
}
