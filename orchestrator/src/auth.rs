//! Client authentication: who may talk to the orchestrator, and what each user may do.
//!
//! Off unless configured. `--requirepass-file` gives the `default` user a password (Redis'
//! `requirepass`); `--users-file` lists users, each with a role and an argon2 password hash:
//!
//! ```text
//! # user   role         password hash (orchestrator --hash-password < password.txt)
//! app      read-write   $argon2id$v=19$m=19456,t=2,p=1$...
//! grafana  read-only    $argon2id$v=19$m=19456,t=2,p=1$...
//! ops      admin        $argon2id$v=19$m=19456,t=2,p=1$...
//! ```
//!
//! Roles nest: `read-only` runs reads, `read-write` also writes, `admin` also the commands
//! that act on the whole cluster. A client authenticates with RESP `AUTH [user] password` or
//! `HELLO <v> AUTH user password`, the text protocol's `auth||[user||]password`, or the
//! binary protocol's `auth` op (the client library's builder).
//!
//! An argon2 check costs tens of milliseconds of CPU, so it runs off the event loop, a few
//! at a time, and a password once verified is remembered (as a salted SHA-256, compared in
//! constant time) so a client reconnecting does not pay it again. Failed attempts are
//! answered later and later (100 ms, doubling to 2 s) and a connection that fails ten times
//! is closed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// What a user may do. Ordered: each role may do what the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Role {
    ReadOnly = 1,
    ReadWrite = 2,
    Admin = 3,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "read-only" => Some(Role::ReadOnly),
            "read-write" => Some(Role::ReadWrite),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::ReadOnly),
            2 => Some(Role::ReadWrite),
            3 => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed before authenticating (AUTH, HELLO with AUTH, QUIT).
    Anyone,
    /// Connection handling (PING, SELECT, CLIENT, ...): any authenticated user.
    Connection,
    Read,
    Write,
    /// Acts on the whole cluster (CONFIG SET, FLUSHALL, ...).
    Admin,
}

impl Access {
    fn needs(self) -> Option<Role> {
        Some(match self {
            Access::Anyone => return None,
            Access::Connection | Access::Read => Role::ReadOnly,
            Access::Write => Role::ReadWrite,
            Access::Admin => Role::Admin,
        })
    }
}

/// One session's identity: who authenticated, and how often it failed.
#[derive(Debug, Default)]
pub struct Who {
    /// A [`Role`] as a number; 0 while not authenticated.
    role: AtomicU8,
    user: Mutex<String>,
    failures: AtomicU32,
}

impl Who {
    /// A session that starts authenticated (no authentication configured).
    pub fn open() -> Who {
        Who {
            role: AtomicU8::new(Role::Admin as u8),
            user: Mutex::new("default".into()),
            failures: AtomicU32::new(0),
        }
    }

    pub fn authenticated(&self) -> bool {
        self.role.load(Ordering::Acquire) != 0
    }

    /// Whether this session may run a command needing `access`.
    pub fn may(&self, access: Access) -> bool {
        let Some(needs) = access.needs() else {
            return true;
        };
        Role::from_u8(self.role.load(Ordering::Acquire)).is_some_and(|r| r >= needs)
    }

    /// Whether this session failed to authenticate too often to keep.
    pub fn exhausted(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= 10
    }

    pub fn user(&self) -> String {
        self.user.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the session `user`. The failures counted so far stay: a client holding one
    /// password could otherwise guess at another user's between its own successful logins
    /// and never be slowed down or closed.
    fn set(&self, user: &str, role: Role) {
        *self.user.lock().unwrap_or_else(|e| e.into_inner()) = user.to_string();
        self.role.store(role as u8, Ordering::Release);
    }

    /// Counts a failed attempt; how long to wait before answering it, and whether the
    /// connection has failed too often to keep. Failures count over the connection's whole
    /// life, successes in between notwithstanding (a client that really mistyped can
    /// reconnect).
    fn failed(&self) -> (Duration, bool) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let delay = Duration::from_millis(100 << (n - 1).min(5)).min(Duration::from_secs(2));
        (delay, n >= 10)
    }
}

/// Why an authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Wrong user or password (Redis' `WRONGPASS`).
    WrongPass,
    /// `AUTH password` with no password configured (Redis' own text for it).
    NoPasswordSet,
    /// Too many failures on this connection: close it.
    TooManyFailures,
}

struct User {
    role: Role,
    /// An argon2 PHC string, or the salted SHA-256 of a `--requirepass-file` password.
    secret: Secret,
}

enum Secret {
    Argon2(String),
    Sha256([u8; 32]),
}

/// The process's users, and the verifications they passed.
pub struct Authenticator {
    users: HashMap<String, User>,
    /// Salts the SHA-256 digests kept of passwords (per process).
    salt: [u8; 32],
    /// Passwords verified with argon2 since start, by user, as salted SHA-256.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// Argon2 checks running at once.
    checks: Arc<Semaphore>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Authenticator {
    /// No authentication: every session is the `default` admin.
    pub fn open() -> Authenticator {
        Authenticator {
            users: HashMap::new(),
            salt: rand::random(),
            verified: Mutex::default(),
            checks: Arc::new(Semaphore::new(1)),
        }
    }

    /// From `--requirepass-file` and `--users-file`; a clear message for a bad file.
    pub fn from_files(
        requirepass: Option<&Path>,
        users: Option<&Path>,
    ) -> Result<Authenticator, String> {
        let mut auth = Authenticator::open();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        auth.checks = Arc::new(Semaphore::new((threads / 2).max(1)));
        if let Some(path) = users {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read users file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let at = || format!("{} line {}", path.display(), n + 1);
                let words: Vec<&str> = line.split_whitespace().collect();
                let [name, role, hash] = words[..] else {
                    return Err(format!(
                        "{}: expected `<user> <read-only|read-write|admin> <argon2 hash>`",
                        at()
                    ));
                };
                let role = Role::parse(role).ok_or_else(|| {
                    format!(
                        "{}: role `{role}` is not read-only, read-write or admin",
                        at()
                    )
                })?;
                PasswordHash::new(hash).map_err(|e| {
                    format!(
                        "{}: not an argon2 password hash ({e}); make one with \
                         `orchestrator --hash-password`",
                        at()
                    )
                })?;
                let user = User {
                    role,
                    secret: Secret::Argon2(hash.to_string()),
                };
                if auth.users.insert(name.to_string(), user).is_some() {
                    return Err(format!("{}: user `{name}` is listed twice", at()));
                }
            }
            if auth.users.is_empty() {
                return Err(format!("{} lists no users", path.display()));
            }
        }
        if let Some(path) = requirepass {
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read password file {}: {e}", path.display()))?,
            );
            let password = text.lines().next().unwrap_or("");
            if password.is_empty() {
                return Err(format!("{}: the password is empty", path.display()));
            }
            let digest = auth.digest(password.as_bytes());
            auth.users.insert(
                "default".into(),
                User {
                    role: Role::Admin,
                    secret: Secret::Sha256(digest),
                },
            );
        }
        Ok(auth)
    }

    /// Whether clients must authenticate.
    pub fn required(&self) -> bool {
        !self.users.is_empty()
    }

    /// A new session's identity: authenticated at once if nothing is required.
    pub fn new_session(&self) -> Who {
        if self.required() {
            Who::default()
        } else {
            Who::open()
        }
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(password);
        h.finalize().into()
    }

    /// Checks `password` for `user` (`None`: the default user) and, if right, makes `who`
    /// that user. A wrong one is answered only after the session's growing delay.
    pub async fn authenticate(
        self: &Arc<Self>,
        who: &Who,
        user: Option<&str>,
        password: &[u8],
    ) -> Result<(), Denied> {
        let name = user.unwrap_or("default");
        if !self.required() {
            // Redis without a password: the default user takes any password by name,
            // and `AUTH password` alone is a configuration mistake worth saying.
            return match user {
                None => Err(Denied::NoPasswordSet),
                Some("default") => Ok(()),
                Some(_) => self.deny(who).await,
            };
        }
        match self.check(name, password).await {
            Some(role) => {
                who.set(name, role);
                Ok(())
            }
            None => self.deny(who).await,
        }
    }

    async fn deny(&self, who: &Who) -> Result<(), Denied> {
        let (delay, too_many) = who.failed();
        tokio::time::sleep(delay).await;
        tracing::info!(user = %who.user(), "failed authentication");
        Err(if too_many {
            Denied::TooManyFailures
        } else {
            Denied::WrongPass
        })
    }

    /// The user's role if `password` is theirs. A name that is no user's costs what a wrong
    /// password does (an argon2 check against another user's hash), so the time an answer
    /// takes does not say which names exist.
    async fn check(self: &Arc<Self>, name: &str, password: &[u8]) -> Option<Role> {
        let digest = self.digest(password);
        let Some(user) = self.users.get(name) else {
            let decoy = self.users.values().find_map(|u| match &u.secret {
                Secret::Argon2(hash) => Some(hash),
                Secret::Sha256(_) => None,
            });
            if let Some(hash) = decoy {
                self.argon2_verifies(hash, password).await;
            }
            return None;
        };
        match &user.secret {
            Secret::Sha256(want) => bool::from(digest.ct_eq(want)).then_some(user.role),
            Secret::Argon2(hash) => {
                let known = self
                    .verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(name)
                    .copied();
                if let Some(known) = known {
                    if bool::from(digest.ct_eq(&known)) {
                        return Some(user.role);
                    }
                }
                let ok = self.argon2_verifies(hash, password).await;
                if ok {
                    self.verified
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.to_string(), digest);
                }
                ok.then_some(user.role)
            }
        }
    }

    /// Whether `password` matches the argon2 `hash`, checked on a blocking thread, a few at
    /// once at most.
    async fn argon2_verifies(&self, hash: &str, password: &[u8]) -> bool {
        let Ok(_permit) = self.checks.clone().acquire_owned().await else {
            return false;
        };
        let (hash, password) = (hash.to_string(), Zeroizing::new(password.to_vec()));
        tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(&password, &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false)
    }
}

/// An argon2id hash of `password` for a users file (`orchestrator --hash-password`).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users_file(text: &str) -> tempfile_path::Path {
        tempfile_path::Path::with(text)
    }

    /// A file that is removed when dropped.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn with(text: &str) -> Path {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "twincache-auth-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).unwrap();
                Path(p)
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn users_roles_and_passwords() {
        let hash = hash_password(b"s3cret").unwrap();
        let file = users_file(&format!(
            "# a comment\n\nalice read-only {hash}\nbob admin {hash}\n"
        ));
        let auth = Arc::new(Authenticator::from_files(None, Some(&file.0)).unwrap());
        assert!(auth.required());
        let who = auth.new_session();
        assert!(!who.authenticated() && !who.may(Access::Connection));
        auth.authenticate(&who, Some("alice"), b"s3cret")
            .await
            .unwrap();
        assert!(who.may(Access::Read) && !who.may(Access::Write));
        // Again, from the cache of verified passwords.
        let who = auth.new_session();
        auth.authenticate(&who, Some("bob"), b"s3cret")
            .await
            .unwrap();
        assert!(who.may(Access::Admin));
        let who = auth.new_session();
        assert_eq!(
            auth.authenticate(&who, Some("bob"), b"wrong").await,
            Err(Denied::WrongPass)
        );
        assert_eq!(
            auth.authenticate(&who, Some("nobody"), b"s3cret").await,
            Err(Denied::WrongPass)
        );
        assert!(!who.authenticated());
    }

    #[tokio::test]
    async fn requirepass_is_the_default_users_password() {
        let file = users_file("hunter2\n");
        let auth = Arc::new(Authenticator::from_files(Some(&file.0), None).unwrap());
        let who = auth.new_session();
        auth.authenticate(&who, None, b"hunter2").await.unwrap();
        assert!(who.may(Access::Admin));
        assert_eq!(who.user(), "default");
    }

    #[tokio::test]
    async fn without_configuration_everyone_is_the_default_admin() {
        let auth = Arc::new(Authenticator::open());
        let who = auth.new_session();
        assert!(who.may(Access::Admin));
        assert_eq!(
            auth.authenticate(&who, None, b"x").await,
            Err(Denied::NoPasswordSet)
        );
        assert_eq!(auth.authenticate(&who, Some("default"), b"x").await, Ok(()));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = |text: &str| {
            let f = users_file(text);
            Authenticator::from_files(None, Some(&f.0)).unwrap_err()
        };
        assert!(err("alice admin").contains("expected"));
        assert!(err("alice root $argon2id$x").contains("role"));
        assert!(err("alice admin plaintext").contains("argon2"));
        assert!(err("# nobody\n").contains("no users"));
    }

    /// A name that is no user's takes an argon2 check too: otherwise its quicker answer
    /// would tell which names exist.
    #[tokio::test]
    async fn an_unknown_name_costs_what_a_wrong_password_does() {
        let hash = hash_password(b"s3cret").unwrap();
        let file = users_file(&format!("alice read-only {hash}\n"));
        let auth = Arc::new(Authenticator::from_files(None, Some(&file.0)).unwrap());
        let time = |name: &'static str| {
            let auth = auth.clone();
            async move {
                let started = std::time::Instant::now();
                assert_eq!(auth.check(name, b"wrong").await, None);
                started.elapsed()
            }
        };
        let (mut known, mut unknown) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            known = known.min(time("alice").await);
            unknown = unknown.min(time("mallory").await);
        }
        assert!(unknown * 4 >= known, "unknown {unknown:?}, known {known:?}");
    }

    #[tokio::test]
    async fn failures_slow_down_and_end_the_connection() {
        let file = users_file("pw\n");
        let auth = Arc::new(Authenticator::from_files(Some(&file.0), None).unwrap());
        let who = auth.new_session();
        tokio::time::pause();
        let mut last = Err(Denied::WrongPass);
        for _ in 0..10 {
            last = auth.authenticate(&who, None, b"nope").await;
        }
        assert_eq!(last, Err(Denied::TooManyFailures));
    }

    /// A success does not reset the count: a client holding one password cannot interleave
    /// its own logins with guesses at another's to stay under the limit, nor to keep the
    /// delay short.
    #[tokio::test]
    async fn successes_in_between_do_not_reset_the_failures() {
        let file = users_file("pw\n");
        let auth = Arc::new(Authenticator::from_files(Some(&file.0), None).unwrap());
        let who = auth.new_session();
        tokio::time::pause();
        for n in 1..=9 {
            assert_eq!(
                auth.authenticate(&who, None, b"nope").await,
                Err(Denied::WrongPass),
                "failure {n}"
            );
        }
        assert_eq!(auth.authenticate(&who, None, b"pw").await, Ok(()));
        assert!(who.authenticated());
        assert!(!who.exhausted());
        // The tenth failure still waits the longest delay, and ends the connection.
        let started = tokio::time::Instant::now();
        assert_eq!(
            auth.authenticate(&who, None, b"nope").await,
            Err(Denied::TooManyFailures)
        );
        // (A reset count would have made it the first failure again: 100 ms.)
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
        assert!(who.exhausted());
    }
}
