//! Credentials for http(s) hosts, and a limit on concurrent requests to one host.
//!
//! A `[[fetch.http_auth]]` rule names a host pattern and how to authenticate there (a bearer
//! token, basic auth, or an arbitrary header such as an API key). The secret itself is never in
//! the config file: it is read at start-up from an environment variable or a secret file, kept
//! as a header value marked sensitive, and never formatted into a log line, an error or a
//! metric ([`Credentials`]' `Debug` shows host patterns only).

use crate::config::ConfigError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use ureq::http::{HeaderName, HeaderValue};

/// How a [`HttpAuthRule`] authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    /// `Authorization: Bearer <secret>`.
    Bearer,
    /// `Authorization: Basic base64(<user>:<secret>)`.
    Basic,
    /// `<header>: <secret>`, e.g. `X-Api-Key`.
    Header,
}

/// One `[[fetch.http_auth]]` entry. The first rule whose `host` matches a request's host is used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthRule {
    /// `images.example.com` (that host only, any port) or `*.example.com` (any host under
    /// example.com, not example.com itself). Case-insensitive.
    pub host: String,
    /// `"bearer"`, `"basic"` or `"header"`.
    pub kind: AuthKind,
    /// The user name, for `kind = "basic"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The header name, for `kind = "header"` only, e.g. `"X-Api-Key"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Environment variable holding the secret (token, password or header value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// File holding the secret, e.g. `/run/secrets/images_token`; one trailing newline is
    /// ignored. Read once at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

/// A host pattern: an exact host, or `*.` and a domain for any host below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower case; for a wildcard, the suffix with its leading dot (`.example.com`).
    text: String,
    wildcard: bool,
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        let lower = pattern.trim().to_ascii_lowercase();
        let (wildcard, domain) = match lower.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, lower.as_str()),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']');
        if domain.is_empty() || !domain.chars().all(valid) || domain.starts_with('.') || domain.ends_with('.') {
            return Err(format!(
                "{pattern:?} is not a host pattern: write a host (images.example.com) or *. and a domain \
                 (*.example.com), without scheme, port or path"
            ));
        }
        let text = if wildcard { format!(".{domain}") } else { domain.to_owned() };
        Ok(HostPattern { text, wildcard })
    }

    /// Whether `host` (as in a URI, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        if self.wildcard {
            host.len() > self.text.len()
                && host.as_bytes()[host.len() - self.text.len()..].eq_ignore_ascii_case(self.text.as_bytes())
        } else {
            host.eq_ignore_ascii_case(&self.text)
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*{}", self.text)
        } else {
            f.write_str(&self.text)
        }
    }
}

/// The header one rule adds, its value marked sensitive.
#[derive(Clone)]
struct ResolvedRule {
    pattern: HostPattern,
    name: HeaderName,
    value: HeaderValue,
}

/// The rules with their secrets read; see the [module documentation](self).
#[derive(Clone, Default)]
pub struct Credentials {
    rules: Vec<ResolvedRule>,
}

// Written out so that no secret can reach a log through `{:?}`.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.rules.iter().map(|r| format!("{} ({}: <redacted>)", r.pattern, r.name))).finish()
    }
}

impl Credentials {
    /// Checks the rules and reads their secrets, from `env` (a variable's value by name) and
    /// secret files. Errors name the rule's key and never contain a secret.
    pub fn resolve(rules: &[HttpAuthRule], env: impl Fn(&str) -> Option<String>) -> Result<Credentials, ConfigError> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| resolve_rule(rule, &format!("fetch.http_auth[{i}]"), &env))
            .collect::<Result<_, _>>()?;
        Ok(Credentials { rules })
    }

    /// Checks the rules' shape without reading any secret (for `dlpipe config check`).
    pub fn check(rules: &[HttpAuthRule]) -> Result<(), ConfigError> {
        for (i, rule) in rules.iter().enumerate() {
            check_rule(rule, &format!("fetch.http_auth[{i}]"))?;
        }
        Ok(())
    }

    /// The header for `host` and the pattern that chose it, if a rule matches.
    pub fn for_host(&self, host: &str) -> Option<(&HeaderName, &HeaderValue, &HostPattern)> {
        self.rules.iter().find(|r| r.pattern.matches(host)).map(|r| (&r.name, &r.value, &r.pattern))
    }
}

fn invalid(key: &str, what: impl fmt::Display) -> ConfigError {
    ConfigError::Value(format!("{key}: {what}"))
}

/// The header name of a rule, after checking that its fields fit its kind.
fn check_rule(rule: &HttpAuthRule, key: &str) -> Result<HeaderName, ConfigError> {
    HostPattern::parse(&rule.host).map_err(|e| invalid(&format!("{key}.host"), e))?;
    if rule.secret_env.is_some() == rule.secret_file.is_some() {
        return Err(invalid(key, "set exactly one of secret_env (a variable's name) and secret_file (a path)"));
    }
    if rule.user.is_some() != (rule.kind == AuthKind::Basic) {
        return Err(invalid(key, "user is required for kind = \"basic\" and allowed only there"));
    }
    if rule.header.is_some() != (rule.kind == AuthKind::Header) {
        return Err(invalid(key, "header is required for kind = \"header\" and allowed only there"));
    }
    match (&rule.kind, &rule.header) {
        (AuthKind::Header, Some(name)) => HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(&format!("{key}.header"), format!("{name:?} is not an HTTP header name"))),
        _ => Ok(ureq::http::header::AUTHORIZATION),
    }
}

fn resolve_rule(
    rule: &HttpAuthRule,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<ResolvedRule, ConfigError> {
    let name = check_rule(rule, key)?;
    let pattern = HostPattern::parse(&rule.host).map_err(|e| invalid(key, e))?;
    let secret = match (&rule.secret_env, &rule.secret_file) {
        (Some(var), _) => env(var)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(&format!("{key}.secret_env"), format!("environment variable {var} is not set")))?,
        (_, Some(path)) => {
            let file_key = format!("{key}.secret_file");
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(&file_key, format!("cannot read {}: {e}", path.display())))?;
            let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_owned();
            if text.is_empty() {
                return Err(invalid(&file_key, format!("{} is empty", path.display())));
            }
            text
        }
        (None, None) => unreachable!("check_rule requires one secret source"),
    };
    let value = match (rule.kind, &rule.user) {
        (AuthKind::Bearer, _) => format!("Bearer {secret}"),
        (AuthKind::Basic, Some(user)) => {
            use base64::Engine;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
        }
        _ => secret,
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        invalid(key, "the secret contains characters an HTTP header cannot carry (control characters or newlines)")
    })?;
    value.set_sensitive(true);
    Ok(ResolvedRule { pattern, name, value })
}

/// At most `max` requests at once to one host (host and port): a semaphore per host, so that
/// many fetch threads cannot overload one image server, while other hosts go on.
#[derive(Debug)]
pub struct HostLimiter {
    max: usize,
    active: Mutex<HashMap<String, usize>>,
    freed: Condvar,
}

/// A place in a host's limit, given back when dropped.
pub struct HostPermit<'a> {
    limiter: &'a HostLimiter,
    host: String,
}

impl HostLimiter {
    /// `max` of 0 is treated as 1.
    pub fn new(max: usize) -> HostLimiter {
        HostLimiter { max: max.max(1), active: Mutex::new(HashMap::new()), freed: Condvar::new() }
    }

    /// Waits until fewer than `max` requests to `host` are in progress, then takes a place.
    pub fn acquire(&self, host: &str) -> HostPermit<'_> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let mut active = self
            .freed
            .wait_while(active, |active| active.get(host).is_some_and(|&n| n >= self.max))
            .unwrap_or_else(|e| e.into_inner());
        *active.entry(host.to_owned()).or_insert(0) += 1;
        HostPermit { limiter: self, host: host.to_owned() }
    }

    /// Requests to `host` in progress now.
    pub fn active(&self, host: &str) -> usize {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).get(host).copied().unwrap_or(0)
    }
}

impl Drop for HostPermit<'_> {
    fn drop(&mut self) {
        let mut active = self.limiter.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = active.get_mut(&self.host) {
            *n -= 1;
            // Entries of idle hosts are removed, so the map holds only hosts being fetched from.
            if *n == 0 {
                active.remove(&self.host);
            }
        }
        drop(active);
        self.limiter.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn rule(host: &str, kind: AuthKind) -> HttpAuthRule {
        HttpAuthRule {
            host: host.into(),
            kind,
            user: (kind == AuthKind::Basic).then(|| "dlpipe".into()),
            header: (kind == AuthKind::Header).then(|| "X-Api-Key".into()),
            secret_env: Some("IMAGES_TOKEN".into()),
            secret_file: None,
        }
    }

    fn env_with(name: &'static str, value: &'static str) -> impl Fn(&str) -> Option<String> {
        move |var| (var == name).then(|| value.to_owned())
    }

    #[test]
    fn host_patterns_match_exact_hosts_and_subdomains_only() {
        let exact = HostPattern::parse("Images.Example.com").unwrap();
        assert!(exact.matches("images.example.com") && exact.matches("IMAGES.example.COM"));
        assert!(exact.matches("images.example.com."), "a fully qualified name is the same host");
        assert!(!exact.matches("cdn.images.example.com") && !exact.matches("images.example.com.evil.net"));
        assert!(!exact.matches("example.com"));
        let wild = HostPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com") && wild.matches("b.a.EXAMPLE.com"));
        assert!(!wild.matches("example.com"), "the wildcard needs a label before the domain");
        assert!(!wild.matches("badexample.com") && !wild.matches("example.com.evil.net"));
        assert_eq!(wild.to_string(), "*.example.com");
        for bad in ["", "*.", "https://example.com", "example.com/x", "*example.com", "a b", ".example.com"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(HostPattern::parse("127.0.0.1").unwrap().matches("127.0.0.1"));
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file_and_never_print() {
        let bearer =
            Credentials::resolve(&[rule("*.example.com", AuthKind::Bearer)], env_with("IMAGES_TOKEN", "tok-1"))
                .unwrap();
        let (name, value, pattern) = bearer.for_host("a.example.com").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("authorization", "Bearer tok-1"));
        assert!(value.is_sensitive());
        assert_eq!(pattern.to_string(), "*.example.com");
        assert!(bearer.for_host("example.org").is_none());
        let printed = format!("{bearer:?}");
        assert!(!printed.contains("tok-1") && printed.contains("*.example.com"), "{printed}");

        let basic =
            Credentials::resolve(&[rule("h", AuthKind::Basic)], env_with("IMAGES_TOKEN", "open sesame")).unwrap();
        // base64("dlpipe:open sesame")
        assert_eq!(basic.for_host("h").unwrap().1, "Basic ZGxwaXBlOm9wZW4gc2VzYW1l");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "key-from-file\n").unwrap();
        let mut header = rule("h", AuthKind::Header);
        header.secret_env = None;
        header.secret_file = Some(file.clone());
        let keyed = Credentials::resolve(&[header.clone()], |_| None).unwrap();
        let (name, value, _) = keyed.for_host("H").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("x-api-key", "key-from-file"));

        // Errors name the key and the source, never the secret.
        let unset = Credentials::resolve(&[rule("h", AuthKind::Bearer)], |_| None).unwrap_err().to_string();
        assert_eq!(unset, "fetch.http_auth[0].secret_env: environment variable IMAGES_TOKEN is not set");
        std::fs::write(&file, "line1\nsecret-line2\n").unwrap();
        let newline = Credentials::resolve(&[header.clone()], |_| None).unwrap_err().to_string();
        assert!(newline.starts_with("fetch.http_auth[0]:") && !newline.contains("secret-line2"), "{newline}");
        header.secret_file = Some(dir.path().join("missing"));
        let missing = Credentials::resolve(&[header], |_| None).unwrap_err().to_string();
        assert!(missing.starts_with("fetch.http_auth[0].secret_file: cannot read"), "{missing}");
    }

    #[test]
    fn rules_are_checked_against_their_kind() {
        let mut both = rule("h", AuthKind::Bearer);
        both.secret_file = Some("/run/secrets/x".into());
        let mut no_user = rule("h", AuthKind::Basic);
        no_user.user = None;
        let mut stray_header = rule("h", AuthKind::Bearer);
        stray_header.header = Some("X-Key".into());
        let mut bad_header = rule("h", AuthKind::Header);
        bad_header.header = Some("X Key".into());
        let cases = [
            (both, "exactly one of secret_env"),
            (no_user, "user is required"),
            (stray_header, "header is required for kind = \"header\" and allowed only there"),
            (bad_header, "fetch.http_auth[0].header: \"X Key\" is not an HTTP header name"),
            (rule("https://h", AuthKind::Bearer), "fetch.http_auth[0].host:"),
        ];
        for (rule, want) in cases {
            let err = Credentials::check(&[rule]).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        assert!(Credentials::check(&[rule("*.example.com", AuthKind::Header)]).is_ok());
    }

    #[test]
    fn the_host_limiter_admits_at_most_max_per_host_and_other_hosts_freely() {
        let limiter = Arc::new(HostLimiter::new(2));
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (limiter, running, peak) = (Arc::clone(&limiter), Arc::clone(&running), Arc::clone(&peak));
                std::thread::spawn(move || {
                    let _permit = limiter.acquire("a:80");
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(10));
        // Another host is not held back by the busy one.
        let other = limiter.acquire("b:80");
        assert_eq!(limiter.active("b:80"), 1);
        drop(other);
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2, "two requests at once to host a, never more");
        assert_eq!((limiter.active("a:80"), limiter.active("b:80")), (0, 0));
        assert!(limiter.active.lock().unwrap().is_empty(), "idle hosts leave no entry");
    }
}
