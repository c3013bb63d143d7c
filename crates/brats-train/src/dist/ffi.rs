//! The C ABI of `csrc/dist_shim.cpp` (linked in) and the NCCL shim (loaded at run time), and
//! the helpers every call through them shares.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    pub(super) fn brats_dist_store_new(
        host: *const c_char,
        port: u16,
        world_size: c_int,
        is_master: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub(super) fn brats_dist_store_free(store: *mut c_void);
    pub(super) fn brats_dist_gloo_new(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    pub(super) fn brats_dist_group_free(group: *mut c_void);
    pub(super) fn brats_dist_allreduce_sum(
        group: *mut c_void,
        tensors: *const *mut C_tensor,
        n: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(super) fn brats_dist_broadcast(
        group: *mut c_void,
        tensors: *const *mut C_tensor,
        n: usize,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(super) fn brats_dist_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub(super) fn brats_dist_abi_version() -> c_int;
    pub(super) fn brats_dist_set_grad(var: *mut C_tensor, grad: *mut C_tensor, err: *mut *mut c_char) -> c_int;
}

/// Runs a shim call and turns its malloc'ed error message into a `String`.
pub(super) fn shim_call<T>(f: impl FnOnce(*mut *mut c_char) -> T) -> (T, Option<String>) {
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = f(&mut err);
    if err.is_null() {
        return (out, None);
    }
    // SAFETY: the shim sets `err` only to a NUL-terminated buffer from malloc, which we own.
    // The Rust message adds its own sentence after libtorch's, so a final period would double.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().trim().trim_end_matches('.').to_string();
    // SAFETY: `err` came from the shim's malloc, is freed exactly once here, and `msg` owns a copy.
    unsafe { libc::free(err.cast()) };
    (out, Some(msg))
}

pub(super) fn tensor_ptrs(tensors: &[Tensor]) -> Vec<*mut C_tensor> {
    tensors.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

pub(super) fn timeout_ms(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Finding and loading the NCCL shim.
pub(super) mod nccl {
    use super::*;
    use std::ffi::CString;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// `brats_dist_nccl_new`, with the signature of `brats_dist_gloo_new`.
    pub(crate) type Constructor = unsafe extern "C" fn(*mut c_void, c_int, c_int, i64, *mut *mut c_char) -> *mut c_void;

    /// The shim's constructor, loading the shim on first use; the reason it cannot be had otherwise.
    pub(crate) fn constructor() -> Result<Constructor, String> {
        static LOADED: OnceLock<Result<usize, String>> = OnceLock::new();
        let addr = LOADED.get_or_init(load).clone()?;
        // SAFETY: `addr` is the address of brats_dist_nccl_new, whose ABI version matched ours.
        Ok(unsafe { std::mem::transmute::<usize, Constructor>(addr) })
    }

    fn dlerror() -> String {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc.
        let e = unsafe { libc::dlerror() };
        if e.is_null() {
            return "unknown dlopen error".into();
        }
        // SAFETY: `e` is non-null, NUL-terminated and valid until the next dlerror call, which
        // cannot happen before the copy below.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into()
    }

    /// Where the shim may be: `BRATS_NCCL_SHIM`, beside the executable (deployments copy it
    /// there), then where this build made it.
    fn candidates() -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Some(p) = std::env::var_os("BRATS_NCCL_SHIM") {
            out.push(PathBuf::from(p));
        }
        if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(|e| e.parent()) {
            out.push(dir.join("libbrats_nccl_shim.so"));
        }
        if let Some(built) = option_env!("BRATS_NCCL_SHIM_BUILT") {
            out.push(PathBuf::from(built));
        }
        out
    }

    fn load() -> Result<usize, String> {
        let cuda = CString::new("libtorch_cuda.so").expect("no NUL");
        // SAFETY: RTLD_NOLOAD only looks at objects already loaded. Re-opening libtorch_cuda.so
        // with RTLD_GLOBAL makes its symbols visible to the shim even where it was first loaded
        // RTLD_LOCAL; the handle is kept for the life of the process.
        let h = unsafe { libc::dlopen(cuda.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD) };
        if h.is_null() {
            return Err("NCCL needs a CUDA build of libtorch (libtorch_cuda.so), and this process loaded a CPU-only \
                 libtorch; use Backend::Gloo on CPU, or point LIBTORCH at a CUDA libtorch and rebuild"
                .into());
        }
        let Some(path) = candidates().into_iter().find(|p| p.exists()) else {
            return Err("this brats-trainer was built without the NCCL shim (libbrats_nccl_shim.so): run \
                 BOOTSTRAP_NCCL=1 scripts/bootstrap.sh and rebuild, or set BRATS_NCCL_SHIM to the shim's path; \
                 Backend::Gloo works meanwhile"
                .into());
        };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: the object is built from csrc/nccl_shim.cpp against this libtorch's headers;
        // loading it runs only those headers' static initialisers.
        let lib = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return Err(format!("loading the NCCL shim {}: {}", path.display(), dlerror()));
        }
        let sym = |name: &str| {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: `lib` is a live handle.
            let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
            if p.is_null() { Err(format!("{} lacks {name}: {}", path.display(), dlerror())) } else { Ok(p) }
        };
        let version = sym("brats_dist_nccl_abi_version")?;
        // SAFETY: the symbol is `int brats_dist_nccl_abi_version(void)`.
        let theirs = unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(version)() };
        // SAFETY: a plain function of the linked-in shim.
        let ours = unsafe { brats_dist_abi_version() };
        if theirs != ours {
            return Err(format!(
                "the NCCL shim {} was built from other sources (ABI {theirs}, this binary {ours}); rebuild it",
                path.display()
            ));
        }
        Ok(sym("brats_dist_nccl_new")? as usize)
    }
}
