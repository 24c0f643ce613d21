//! The host's key: every call on every channel presents it, and nothing is served without it.
//!
//! Kernel AF_VSOCK is open to every local user of the host (guest CIDs are small and
//! sequential), so a listener that trusted its peers would run anyone's commands as root.
//! The host gives each boot a key of its own out of band: in an archive of the initramfs,
//! which `/init` hands to the agent in its environment (`BANGER_AGENT_KEY`, 64 hex digits),
//! never on the kernel's command line (which the host's `/proc` shows to everyone). Calls
//! carry it as `authorization: Bearer <hex>`; `IDENTITY` lines on the serial port as their
//! first word.
//!
//! A `SetIdentity` that carries a new key (a clone of a snapshot, a pool claim) replaces it.
//! The key that made that call stays good until the new one is first used: the host writes
//! the new key down only once the call succeeded, so a host that dies in between still
//! reaches its guest with the key it has; the host then uses the new key at once (a `PING`
//! with it on the serial port, its next call elsewhere), which retires the old one.
//!
//! The keys live in a page shared between PID 1 and the server it forks, so a server that
//! died and was forked again keeps the key the host rotated to (a copy made at boot would
//! bring back the boot key: a clone's source's).

use std::sync::Mutex;

use tonic::{Request, Status};

/// A key's length in bytes.
pub const KEY_BYTES: usize = 32;
/// The environment variable `/init` passes the boot key in.
pub const KEY_ENV: &str = "BANGER_AGENT_KEY";

/// A key the host presents.
pub type Key = [u8; KEY_BYTES];

/// The keys the agent accepts, in the shared page.
#[repr(C)]
#[derive(Clone, Copy)]
struct Keys {
    current: Key,
    previous: Key,
    has_current: bool,
    has_previous: bool,
}

/// Where the keys are: a shared anonymous mapping (or, where that failed, a leaked box).
struct Store(*mut Keys);

// SAFETY: the pointer is to memory that lives as long as the process, and every access goes
// through `STORE`'s mutex.
unsafe impl Send for Store {}

static STORE: Mutex<Option<Store>> = Mutex::new(None);

/// The key a call was authenticated with, kept in its extensions for `SetIdentity`.
#[derive(Debug, Clone, Copy)]
pub struct Presented(pub Key);

/// Takes the boot key from the environment (and removes it from there, so no process the
/// agent starts inherits it) into memory that outlives a fork. Must run before any thread
/// exists: the environment is not thread-safe, and the supervisor's fork copies one thread.
pub fn init_from_env() {
    let key = std::env::var(KEY_ENV).ok();
    // SAFETY: called from main before the runtime or any other thread is started.
    unsafe { std::env::remove_var(KEY_ENV) };
    let key = match key.as_deref().map(parse_hex) {
        Some(Some(key)) => Some(key),
        Some(None) => {
            log!("{KEY_ENV} is not {KEY_BYTES} bytes of hex: every call will be refused");
            None
        }
        None => {
            log!("no key from the host ({KEY_ENV} unset): every call will be refused");
            None
        }
    };
    init(key);
}

/// Sets the accepted key (tests; `init_from_env` at boot).
pub fn init(key: Option<Key>) {
    let keys = Keys {
        current: key.unwrap_or([0; KEY_BYTES]),
        previous: [0; KEY_BYTES],
        has_current: key.is_some(),
        has_previous: false,
    };
    let mut store = STORE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let pointer = match store.as_ref() {
        Some(existing) => existing.0,
        None => shared_page(),
    };
    // SAFETY: `pointer` is valid for a `Keys` (see `shared_page`), and the lock is held.
    unsafe { pointer.write(keys) };
    *store = Some(Store(pointer));
}

/// A page shared with the processes this one forks, or leaked memory where mmap fails.
fn shared_page() -> *mut Keys {
    use nix::libc;
    // SAFETY: an anonymous mapping with no address hint; the result is checked.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            std::mem::size_of::<Keys>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        log!("cannot map a shared page for the host's key: {}", std::io::Error::last_os_error());
        return Box::into_raw(Box::new(Keys {
            current: [0; KEY_BYTES],
            previous: [0; KEY_BYTES],
            has_current: false,
            has_previous: false,
        }));
    }
    page.cast()
}

/// Runs `f` on the keys under the lock; `None` before [`init`].
fn with_keys<T>(f: impl FnOnce(&mut Keys) -> T) -> Option<T> {
    let store = STORE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: the pointer is valid (see `init`) and the lock is held.
    store.as_ref().map(|store| f(unsafe { &mut *store.0 }))
}

/// Checks a presented key: the current one (which retires a previous one: the host has
/// written the current one down), or a previous one not yet retired.
pub fn check(presented: &[u8]) -> Result<Key, Status> {
    let refused = || Status::unauthenticated("the host's key is missing or wrong");
    let presented: Key = presented.try_into().map_err(|_| refused())?;
    with_keys(|keys| {
        if keys.has_current && equal(&keys.current, &presented) {
            keys.has_previous = false;
            keys.previous = [0; KEY_BYTES];
            Ok(presented)
        } else if keys.has_previous && equal(&keys.previous, &presented) {
            Ok(presented)
        } else {
            Err(refused())
        }
    })
    .unwrap_or_else(|| Err(refused()))
}

/// Makes `new` the key, keeping `authenticated_with` (the key of the call that said so) good
/// until `new` is first used.
pub fn rotate(new: Key, authenticated_with: Key) {
    with_keys(|keys| {
        keys.previous = authenticated_with;
        keys.has_previous = true;
        keys.current = new;
        keys.has_current = true;
    });
}

/// A key sent in a `SetIdentityRequest`: exactly [`KEY_BYTES`] bytes, or none.
pub fn new_key(bytes: &[u8]) -> Result<Option<Key>, Status> {
    match bytes.len() {
        0 => Ok(None),
        KEY_BYTES => Ok(bytes.try_into().ok()),
        n => Err(Status::invalid_argument(format!("agent_key: {n} bytes, not {KEY_BYTES}"))),
    }
}

/// The gRPC servers' interceptor: a call without the key never reaches a method.
#[allow(clippy::result_large_err)]
pub fn intercept(mut request: Request<()>) -> Result<Request<()>, Status> {
    let presented = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(parse_hex)
        .ok_or_else(|| Status::unauthenticated("the host's key is missing or wrong"))?;
    let key = check(&presented)?;
    request.extensions_mut().insert(Presented(key));
    Ok(request)
}

/// 64 hex digits as a key.
pub fn parse_hex(text: &str) -> Option<Key> {
    let mut key = [0u8; KEY_BYTES];
    hex::decode_to_slice(text.trim(), &mut key).ok()?;
    Some(key)
}

/// Compares in time that does not depend on where the keys differ.
fn equal(a: &Key, b: &Key) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Held by the tests that set the process-wide keys.
#[cfg(test)]
pub static TEST_LOCK: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_key_or_a_previous_one_until_the_current_is_used_is_accepted() {
        let _store = TEST_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        init(None);
        assert_eq!(check(&[1; KEY_BYTES]).expect_err("no key").code(), tonic::Code::Unauthenticated);
        let (boot, clone, wrong) = ([1u8; KEY_BYTES], [2u8; KEY_BYTES], [3u8; KEY_BYTES]);
        init(Some(boot));
        assert!(check(&boot).is_ok());
        assert!(check(&wrong).is_err());
        assert!(check(&boot[..31]).is_err(), "a prefix");
        assert!(check(&[]).is_err(), "nothing");
        rotate(clone, boot);
        assert!(check(&boot).is_ok(), "the old key until the new one is used");
        assert!(check(&clone).is_ok());
        assert!(check(&boot).is_err(), "retired once the new key was used");
        assert!(check(&clone).is_ok());

        let call = |value: Option<&str>| {
            let mut request = Request::new(());
            if let Some(value) = value {
                request.metadata_mut().insert("authorization", value.parse().expect("ascii"));
            }
            intercept(request).map(|r| r.extensions().get::<Presented>().map(|p| p.0))
        };
        assert_eq!(call(Some(&format!("Bearer {}", hex::encode(clone)))).expect("ok"), Some(clone));
        for refused in [None, Some("Bearer"), Some("Bearer zz"), Some(&*format!("Basic {}", hex::encode(clone)))] {
            assert_eq!(call(refused).expect_err("refused").code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        assert_eq!(new_key(&[]).expect("none"), None);
        assert_eq!(new_key(&clone).expect("one"), Some(clone));
        assert!(new_key(&[0; 16]).is_err());
    }
}
