//! Two-layer configuration: `raw` mirrors `config.toml` for serde (unknown keys are errors), and
//! [`Config`] is what the rest of the proxy trusts. Validation returns [`ConfigError`] and never
//! panics, because a hot reload must be able to reject a bad file and keep serving.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::Authority;
use serde::Deserialize;
use toml::Spanned;

/// Environment variable that overrides `[affinity] secret`, so the key can stay out of the file.
pub const SECRET_ENV: &str = "STICKYLB_SECRET";
/// Largest accepted backend weight; bounds the round-robin wheel.
pub const MAX_WEIGHT: u32 = 1000;

/// A configuration problem, located precisely enough to fix without reading the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the problem is tied to one place in the file.
    pub line: Option<usize>,
    /// Dotted key path such as `backends[1].weight`; empty for whole-file problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    LeastConnections,
}

/// Where the affinity secret came from; a generated one means pins do not survive a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    File,
    Env,
    Generated,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub listener: ListenerConfig,
    pub affinity: AffinityConfig,
    pub balancer: BalancerConfig,
    pub health: HealthConfig,
    pub timeouts: TimeoutConfig,
    pub backends: Vec<BackendConfig>,
    /// The admin listener; absent means none.
    pub admin: Option<AdminConfig>,
    /// Runtime worker threads; None means one per core.
    pub workers: Option<usize>,
    /// Whether a single worker sends requests to backends through io_uring (module `uring`).
    pub io_uring: bool,
    pub limits: LimitConfig,
}

#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Open client connections; beyond it, stickylb stops accepting until one closes.
    pub max_connections: usize,
    /// Largest request head (request line and headers); larger heads get 431.
    pub max_header_bytes: usize,
    /// Largest request body; larger ones get 413. None: no limit.
    pub max_body_bytes: Option<u64>,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// Bearer token required on every admin request except the dashboard page itself.
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = self.token.as_ref().map(|_| "<redacted>");
        f.debug_struct("AdminConfig")
            .field("address", &self.address)
            .field("token", &token)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub forwarding: ForwardingConfig,
    /// TLS termination; absent means plain HTTP (HTTP/1.1 and h2c).
    pub tls: Option<crate::tls::TlsConfig>,
}

/// Who may tell us about the client: forwarding headers from these peers are extended, from
/// anyone else replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardingConfig {
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Also send RFC 7239 `Forwarded`.
    pub forwarded: bool,
}

impl ForwardingConfig {
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

#[derive(Clone)]
pub struct AffinityConfig {
    pub cookie: String,
    pub secret: Vec<u8>,
    pub secret_source: SecretSource,
    pub http_only: bool,
    pub secure: bool,
    pub same_site: SameSite,
    pub max_age: Option<Duration>,
    /// Keys that signed pins before a rotation: accepted, and re-issued under `secret`.
    pub previous_secrets: Vec<Vec<u8>>,
}

impl fmt::Debug for AffinityConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AffinityConfig")
            .field("cookie", &self.cookie)
            .field("secret", &"<redacted>")
            .field("secret_source", &self.secret_source)
            .field("http_only", &self.http_only)
            .field("secure", &self.secure)
            .field("same_site", &self.same_site)
            .field("max_age", &self.max_age)
            .field("previous_secrets", &self.previous_secrets.len())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct BalancerConfig {
    pub algorithm: Algorithm,
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: NonZeroU32,
    pub fall: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct TimeoutConfig {
    pub client_header: Duration,
    /// A quiet HTTP/1 client connection is parked (its buffers freed) after this long.
    pub client_park: Duration,
    pub backend_connect: Duration,
    /// A pooled upstream connection unused for this long is closed.
    pub backend_idle: Duration,
    pub backend_response: Duration,
    pub shutdown_grace: Duration,
    /// An upgraded connection (WebSocket) with no bytes either way for this long is closed.
    pub tunnel_idle: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub id: String,
    pub address: Authority,
    pub weight: NonZeroU32,
}

mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        pub listener: Listener,
        #[serde(default)]
        pub affinity: Affinity,
        #[serde(default)]
        pub balancer: Balancer,
        #[serde(default)]
        pub health: Health,
        #[serde(default)]
        pub timeouts: Timeouts,
        #[serde(default)]
        pub backends: Vec<Backend>,
        pub admin: Option<Admin>,
        #[serde(default)]
        pub runtime: Runtime,
        #[serde(default)]
        pub limits: Limits,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Limits {
        pub max_connections: Spanned<usize>,
        pub max_header_bytes: Spanned<usize>,
        pub max_body_bytes: Option<Spanned<usize>>,
    }

    impl Default for Limits {
        fn default() -> Self {
            Self {
                max_connections: Spanned::new(0..0, 10_000),
                max_header_bytes: Spanned::new(0..0, 64 * 1024),
                max_body_bytes: None,
            }
        }
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Runtime {
        pub workers: Option<Spanned<usize>>,
        pub io_uring: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub address: Spanned<String>,
        pub token: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listener {
        pub address: Spanned<String>,
        #[serde(default)]
        pub trusted_proxies: Vec<Spanned<String>>,
        #[serde(default)]
        pub forwarded: bool,
        pub tls: Option<Tls>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Affinity {
        pub cookie: Spanned<String>,
        pub secret: Option<Spanned<String>>,
        pub http_only: bool,
        pub secure: bool,
        pub same_site: Spanned<SameSite>,
        #[serde(with = "humantime_serde")]
        pub max_age: Option<Duration>,
        pub previous_secrets: Vec<Spanned<String>>,
    }

    impl Default for Affinity {
        fn default() -> Self {
            Self {
                cookie: Spanned::new(0..0, "stickylb".into()),
                secret: None,
                http_only: true,
                secure: false,
                same_site: Spanned::new(0..0, SameSite::Lax),
                max_age: None,
                previous_secrets: Vec::new(),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Balancer {
        pub algorithm: Algorithm,
        pub retries: Spanned<u32>,
    }

    impl Default for Balancer {
        fn default() -> Self {
            Self {
                algorithm: Algorithm::RoundRobin,
                retries: Spanned::new(0..0, 2),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Health {
        pub path: Spanned<String>,
        #[serde(with = "humantime_serde")]
        pub interval: Duration,
        #[serde(with = "humantime_serde")]
        pub timeout: Duration,
        pub rise: NonZeroU32,
        pub fall: NonZeroU32,
    }

    impl Default for Health {
        fn default() -> Self {
            Self {
                path: Spanned::new(0..0, "/healthz".into()),
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: NonZeroU32::MIN.saturating_add(1),
                fall: NonZeroU32::MIN.saturating_add(1),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Timeouts {
        #[serde(with = "humantime_serde")]
        pub client_header: Duration,
        #[serde(with = "humantime_serde")]
        pub client_park: Duration,
        #[serde(with = "humantime_serde")]
        pub backend_connect: Duration,
        #[serde(with = "humantime_serde")]
        pub backend_idle: Duration,
        #[serde(with = "humantime_serde")]
        pub backend_response: Duration,
        #[serde(with = "humantime_serde")]
        pub shutdown_grace: Duration,
        #[serde(with = "humantime_serde")]
        pub tunnel_idle: Duration,
    }

    impl Default for Timeouts {
        fn default() -> Self {
            Self {
                client_header: Duration::from_secs(10),
                client_park: Duration::from_secs(1),
                backend_connect: Duration::from_secs(2),
                backend_idle: Duration::from_secs(4),
                backend_response: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(10),
                tunnel_idle: Duration::from_secs(3600),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Backend {
        pub id: Spanned<String>,
        pub address: Spanned<String>,
        #[serde(default = "one")]
        pub weight: Spanned<NonZeroU32>,
    }

    fn one() -> Spanned<NonZeroU32> {
        Spanned::new(0..0, NonZeroU32::MIN)
    }
}

impl Config {
    /// Reads and validates `path`. `env_secret` is the value of [`SECRET_ENV`], passed in so tests
    /// do not depend on the process environment.
    pub fn load(path: &Path, env_secret: Option<String>) -> Result<Self, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read file: {e}"),
        })?;
        Self::parse(&src, path, env_secret)
    }

    /// Validates configuration text; `file` is only used to label errors.
    pub fn parse(src: &str, file: &Path, env_secret: Option<String>) -> Result<Self, ConfigError> {
        let ctx = Ctx { src, file };
        let de = toml::Deserializer::new(src);
        let raw: raw::Config = serde_path_to_error::deserialize(de).map_err(|e| ctx.serde(e))?;
        validate(raw, &ctx, env_secret)
    }
}

/// Source text and file name, to turn byte spans into `file:line` errors.
struct Ctx<'a> {
    src: &'a str,
    file: &'a Path,
}

impl Ctx<'_> {
    fn line_of(&self, span: std::ops::Range<usize>) -> Option<usize> {
        if span.is_empty() && span.start == 0 {
            return None; // a default value: it has no place in the file
        }
        let upto = self.src.get(..span.start)?;
        Some(upto.bytes().filter(|&b| b == b'\n').count() + 1)
    }

    fn error(&self, span: std::ops::Range<usize>, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: self.line_of(span),
            key: key.to_string(),
            message,
        }
    }

    fn serde(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        // `Spanned` fields add a private segment to the path; it means nothing to a user.
        let path = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        let key = if path == "." { String::new() } else { path };
        let inner = e.into_inner();
        let span = inner.span().unwrap_or(0..0);
        let mut message = inner.message().trim().to_string();
        if message.contains("expected a duration") {
            message.push_str(" (durations look like \"500ms\", \"2s\", \"1m\", \"1h\")");
        }
        ConfigError {
            line: self.line_of(span).or(Some(1)),
            ..self.error(0..0, &key, message)
        }
    }
}

fn validate(
    raw: raw::Config,
    ctx: &Ctx,
    env_secret: Option<String>,
) -> Result<Config, ConfigError> {
    let listener = listener(raw.listener, ctx)?;
    let admin = raw.admin.map(|a| admin(a, ctx)).transpose()?;
    let workers = raw.runtime.workers.map(|w| workers(&w, ctx)).transpose()?;
    let limits = limits(&raw.limits, ctx)?;
    let mut affinity = affinity(raw.affinity, ctx, env_secret)?;
    // Under TLS the pin never travels in clear text, whatever the file says.
    affinity.secure |= listener.tls.is_some();
    let health = health(raw.health, ctx)?;
    let balancer = balancer(&raw.balancer, ctx)?;
    let backends = backends(raw.backends, ctx)?;
    Ok(Config {
        file: ctx.file.to_path_buf(),
        admin,
        workers,
        io_uring: raw.runtime.io_uring.unwrap_or(true),
        limits,
        listener,
        affinity,
        balancer,
        health,
        timeouts: timeouts(raw.timeouts, ctx)?,
        backends,
    })
}

fn listener(raw: raw::Listener, ctx: &Ctx) -> Result<ListenerConfig, ConfigError> {
    Ok(ListenerConfig {
        address: socket_addr(&raw.address, "listener.address", ctx)?,
        forwarding: ForwardingConfig {
            trusted_proxies: trusted_proxies(&raw.trusted_proxies, ctx)?,
            forwarded: raw.forwarded,
        },
        tls: raw.tls.map(|t| tls(t, ctx)).transpose()?,
    })
}

fn limits(raw: &raw::Limits, ctx: &Ctx) -> Result<LimitConfig, ConfigError> {
    let max_body_bytes = match &raw.max_body_bytes {
        Some(v) => Some(bounded(v, "limits.max_body_bytes", 1, usize::MAX, ctx)? as u64),
        None => None,
    };
    Ok(LimitConfig {
        max_connections: bounded(
            &raw.max_connections,
            "limits.max_connections",
            1,
            1_000_000,
            ctx,
        )?,
        max_header_bytes: bounded(
            &raw.max_header_bytes,
            "limits.max_header_bytes",
            8192,
            1 << 20,
            ctx,
        )?,
        max_body_bytes,
    })
}

fn balancer(raw: &raw::Balancer, ctx: &Ctx) -> Result<BalancerConfig, ConfigError> {
    let retries = *raw.retries.get_ref();
    if retries > 16 {
        return Err(ctx.error(
            raw.retries.span(),
            "balancer.retries",
            format!("{retries} is too many: valid values are 0 to 16"),
        ));
    }
    Ok(BalancerConfig {
        algorithm: raw.algorithm,
        retries,
    })
}

fn socket_addr(value: &Spanned<String>, key: &str, ctx: &Ctx) -> Result<SocketAddr, ConfigError> {
    value.get_ref().parse().map_err(|_| {
        let msg = format!(
            "invalid address {:?}: expected IP:port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"",
            value.get_ref()
        );
        ctx.error(value.span(), key, msg)
    })
}

fn workers(value: &Spanned<usize>, ctx: &Ctx) -> Result<usize, ConfigError> {
    bounded(value, "runtime.workers", 1, 1024, ctx)
}

fn bounded(
    value: &Spanned<usize>,
    key: &str,
    min: usize,
    max: usize,
    ctx: &Ctx,
) -> Result<usize, ConfigError> {
    match *value.get_ref() {
        n if (min..=max).contains(&n) => Ok(n),
        n => Err(ctx.error(
            value.span(),
            key,
            format!("{n} is out of range: valid values are {min} to {max}"),
        )),
    }
}

fn admin(raw: raw::Admin, ctx: &Ctx) -> Result<AdminConfig, ConfigError> {
    let address = socket_addr(&raw.address, "admin.address", ctx)?;
    let token = raw.token.filter(|t| !t.is_empty());
    if !address.ip().is_loopback() && token.is_none() {
        let msg = format!("{address} is reachable from other machines: set admin.token, or use a loopback address");
        return Err(ctx.error(raw.address.span(), "admin.address", msg));
    }
    Ok(AdminConfig { address, token })
}

/// Paths are relative to the config file's directory.
fn tls(raw: raw::Tls, ctx: &Ctx) -> Result<crate::tls::TlsConfig, ConfigError> {
    let dir = ctx.file.parent().unwrap_or(Path::new("."));
    let (cert, key) = (dir.join(raw.cert.get_ref()), dir.join(raw.key.get_ref()));
    crate::tls::TlsConfig::load(cert, key).map_err(|e| {
        let span = if e.which == "cert" {
            raw.cert.span()
        } else {
            raw.key.span()
        };
        ctx.error(span, &format!("listener.tls.{}", e.which), e.message)
    })
}

/// CIDR blocks (`10.0.0.0/8`, `fd00::/8`) or single addresses.
fn trusted_proxies(raw: &[Spanned<String>], ctx: &Ctx) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    raw.iter()
        .map(|s| {
            let text = s.get_ref().trim();
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    let msg = format!(
                        "invalid network {text:?}: use CIDR notation (\"10.0.0.0/8\", \"fd00::/8\") or one address"
                    );
                    ctx.error(s.span(), "listener.trusted_proxies", msg)
                })
        })
        .collect()
}

fn affinity(
    raw: raw::Affinity,
    ctx: &Ctx,
    env_secret: Option<String>,
) -> Result<AffinityConfig, ConfigError> {
    let name = raw.cookie.get_ref();
    if name.is_empty() || !name.bytes().all(is_cookie_name_byte) {
        let msg = format!("invalid cookie name {name:?}: use letters, digits and !#$%&'*+-.^_`|~");
        return Err(ctx.error(raw.cookie.span(), "affinity.cookie", msg));
    }
    let same_site = *raw.same_site.get_ref();
    if same_site == SameSite::None && !raw.secure {
        let msg = "same_site = \"none\" needs secure = true (browsers drop such cookies otherwise)"
            .to_string();
        return Err(ctx.error(raw.same_site.span(), "affinity.same_site", msg));
    }
    let previous_secrets = previous_secrets(raw.previous_secrets, ctx)?;
    let (secret, secret_source) = secret(raw.secret, ctx, env_secret)?;
    if raw.max_age.is_some_and(|d| d.as_secs() == 0) {
        return Err(ctx.error(
            0..0,
            "affinity.max_age",
            "must be at least 1s; remove it for a session cookie".into(),
        ));
    }
    Ok(AffinityConfig {
        cookie: raw.cookie.into_inner(),
        secret,
        secret_source,
        http_only: raw.http_only,
        secure: raw.secure,
        same_site,
        max_age: raw.max_age,
        previous_secrets,
    })
}

const SECRET_TOO_SHORT: &str = "too short: use at least 16 characters (32 random ones are best)";

fn too_short(s: &Spanned<String>) -> bool {
    s.get_ref().len() < 16
}

/// The signing secret: the environment's, else the file's, else a random one per start.
fn secret(
    raw: Option<Spanned<String>>,
    ctx: &Ctx,
    env_secret: Option<String>,
) -> Result<(Vec<u8>, SecretSource), ConfigError> {
    Ok(match (env_secret.filter(|s| !s.is_empty()), raw) {
        (Some(env), _) => (env.into_bytes(), SecretSource::Env),
        (None, Some(s)) if too_short(&s) => {
            let msg = format!("secret is {SECRET_TOO_SHORT}");
            return Err(ctx.error(s.span(), "affinity.secret", msg));
        }
        (None, Some(s)) => (s.into_inner().into_bytes(), SecretSource::File),
        (None, None) => (rand::random::<[u8; 32]>().to_vec(), SecretSource::Generated),
    })
}

/// Secrets still accepted (and re-issued under the current one) while a rotation completes.
fn previous_secrets(raw: Vec<Spanned<String>>, ctx: &Ctx) -> Result<Vec<Vec<u8>>, ConfigError> {
    if let Some(s) = raw.iter().find(|s| too_short(s)) {
        let msg = format!("a previous secret is {SECRET_TOO_SHORT}");
        return Err(ctx.error(s.span(), "affinity.previous_secrets", msg));
    }
    Ok(raw
        .into_iter()
        .map(|s| s.into_inner().into_bytes())
        .collect())
}

/// RFC 6265 cookie-name characters (an HTTP token).
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn health(raw: raw::Health, ctx: &Ctx) -> Result<HealthConfig, ConfigError> {
    let path = raw.path.get_ref();
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        let msg = format!("invalid path {path:?}: expected an absolute path such as \"/healthz\"");
        return Err(ctx.error(raw.path.span(), "health.path", msg));
    }
    for (key, value) in [
        ("health.interval", raw.interval),
        ("health.timeout", raw.timeout),
    ] {
        if value < Duration::from_millis(10) {
            return Err(ctx.error(
                0..0,
                key,
                format!(
                    "{} is too short: the minimum is 10ms",
                    humantime::format_duration(value)
                ),
            ));
        }
    }
    Ok(HealthConfig {
        path: raw.path.into_inner(),
        interval: raw.interval,
        timeout: raw.timeout,
        rise: raw.rise,
        fall: raw.fall,
    })
}

fn timeouts(raw: raw::Timeouts, ctx: &Ctx) -> Result<TimeoutConfig, ConfigError> {
    let all = [
        ("timeouts.client_header", raw.client_header),
        ("timeouts.client_park", raw.client_park),
        ("timeouts.backend_connect", raw.backend_connect),
        ("timeouts.backend_idle", raw.backend_idle),
        ("timeouts.backend_response", raw.backend_response),
        ("timeouts.tunnel_idle", raw.tunnel_idle),
    ];
    // The upper bound keeps deadlines computed from these far from the clock's own limits.
    let longest = Duration::from_secs(30 * 24 * 3600);
    for (key, value) in all {
        if value < Duration::from_millis(1) || value > longest {
            return Err(ctx.error(0..0, key, "must be between 1ms and 30d".into()));
        }
    }
    Ok(TimeoutConfig {
        client_header: raw.client_header,
        client_park: raw.client_park,
        backend_connect: raw.backend_connect,
        backend_idle: raw.backend_idle,
        backend_response: raw.backend_response,
        shutdown_grace: raw.shutdown_grace,
        tunnel_idle: raw.tunnel_idle,
    })
}

fn backends(raw: Vec<raw::Backend>, ctx: &Ctx) -> Result<Vec<BackendConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ctx.error(
            0..0,
            "backends",
            "no backends: add at least one [[backends]] table with id and address".into(),
        ));
    }
    let mut out: Vec<BackendConfig> = Vec::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("backends[{i}].{k}");
        backend_id(b.id.get_ref(), &out).map_err(|m| ctx.error(b.id.span(), &key("id"), m))?;
        let weight = *b.weight.get_ref();
        if weight.get() > MAX_WEIGHT {
            let msg = format!("weight {weight} is too large: valid values are 1 to {MAX_WEIGHT}");
            return Err(ctx.error(b.weight.span(), &key("weight"), msg));
        }
        let address = backend_address(&b.address)
            .map_err(|m| ctx.error(b.address.span(), &key("address"), m))?;
        out.push(BackendConfig {
            id: b.id.into_inner(),
            address,
            weight,
        });
    }
    Ok(out)
}

/// Ids go into logs, metrics labels and the failover header: a short, safe alphabet, and unique.
fn backend_id(id: &str, earlier: &[BackendConfig]) -> Result<(), String> {
    let safe = |c: u8| c.is_ascii_alphanumeric() || b"-_.".contains(&c);
    if id.is_empty() || !id.bytes().all(safe) {
        return Err(format!(
            "invalid id {id:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    if id.len() > 64 {
        return Err("id is longer than 64 characters".into());
    }
    if earlier.iter().any(|o| o.id == id) {
        return Err(format!("duplicate id {id:?}: ids must be unique"));
    }
    Ok(())
}

fn backend_address(value: &Spanned<String>) -> Result<Authority, String> {
    let text = value.get_ref();
    let bad = || {
        format!("invalid address {text:?}: expected host:port, e.g. \"127.0.0.1:9001\" or \"app1.internal:8080\"")
    };
    let authority: Authority = text.parse().map_err(|_| bad())?;
    if authority.port_u16().is_none()
        || authority.as_str().contains('@')
        || authority.host().is_empty()
    {
        return Err(bad());
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[listener]
address = "127.0.0.1:8080"

[affinity]
secret = "0123456789abcdef0123"

[[backends]]
id = "a"
address = "127.0.0.1:9001"

[[backends]]
id = "b"
address = "localhost:9002"
weight = 3
"#;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(src, Path::new("test.toml"), None)
    }

    fn err(src: &str) -> ConfigError {
        match parse(src) {
            Ok(_) => panic!("expected an error for:\n{src}"),
            Err(e) => e,
        }
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.affinity.cookie, "stickylb");
        assert_eq!(c.affinity.secret_source, SecretSource::File);
        assert_eq!(c.balancer.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.balancer.retries, 2);
        assert_eq!(c.health.interval, Duration::from_secs(1));
        assert_eq!(c.backends[1].weight.get(), 3);
        assert_eq!(c.backends[1].address.as_str(), "localhost:9002");
    }

    #[test]
    fn env_secret_overrides_file_and_missing_secret_is_generated() {
        let c = Config::parse(GOOD, Path::new("x"), Some("from-env".into())).expect("valid");
        assert_eq!(c.affinity.secret, b"from-env");
        assert_eq!(c.affinity.secret_source, SecretSource::Env);
        let no_secret = GOOD.replace("secret = \"0123456789abcdef0123\"", "");
        let c = parse(&no_secret).expect("valid");
        assert_eq!(c.affinity.secret_source, SecretSource::Generated);
        assert_eq!(c.affinity.secret.len(), 32);
    }

    #[test]
    fn errors_name_file_line_key_and_valid_values() {
        let cases: &[(&str, &str, usize, &str, &str)] = &[
            (
                "algorithm = \"rnd\"",
                "[balancer]\nalgorithm = \"rnd\"",
                18,
                "balancer.algorithm",
                "least_connections",
            ),
            (
                "same_site",
                "[balancer]\nretries = 1\n[affinity.x]",
                19,
                "affinity.x",
                "unknown field `x`",
            ),
            (
                "unknown key",
                "[health]\nbogus = 1",
                18,
                "health.bogus",
                "expected one of `path`, `interval`",
            ),
            (
                "bad duration",
                "[health]\ninterval = \"fast\"",
                18,
                "health.interval",
                "500ms",
            ),
            (
                "zero rise",
                "[health]\nrise = 0",
                18,
                "health.rise",
                "nonzero",
            ),
            (
                "too many retries",
                "[balancer]\nretries = 17",
                18,
                "balancer.retries",
                "valid values are 0 to 16",
            ),
        ];
        for (name, extra, line, key, needle) in cases {
            let e = err(&format!("{GOOD}\n{extra}\n"));
            assert_eq!(e.file, Path::new("test.toml"), "{name}");
            assert_eq!(e.line, Some(*line), "{name}: {e}");
            assert_eq!(e.key, *key, "{name}: {e}");
            assert!(e.to_string().contains(needle), "{name}: {e}");
        }
    }

    #[test]
    fn timeouts_outside_1ms_to_30_days_are_refused() {
        for value in ["0s", "31days", "1000years"] {
            let e = err(&format!(
                "{GOOD}\n[timeouts]\nbackend_response = \"{value}\"\n"
            ));
            assert_eq!(e.key, "timeouts.backend_response", "{value}: {e}");
            assert!(
                e.to_string().contains("between 1ms and 30d"),
                "{value}: {e}"
            );
        }
        assert!(parse(&format!(
            "{GOOD}\n[timeouts]\nbackend_response = \"30days\"\n"
        ))
        .is_ok());
    }

    #[test]
    fn backend_errors_point_at_the_entry() {
        let dup = GOOD.replace("id = \"b\"", "id = \"a\"");
        let e = err(&dup);
        assert_eq!(
            (e.key.as_str(), e.line),
            ("backends[1].id", Some(13)),
            "{e}"
        );
        assert!(e.message.contains("duplicate"));

        let e = err(&GOOD.replace("\"localhost:9002\"", "\"localhost\""));
        assert_eq!(
            (e.key.as_str(), e.line),
            ("backends[1].address", Some(14)),
            "{e}"
        );
        assert!(e.message.contains("host:port"));

        let e = err(&GOOD.replace("weight = 3", "weight = 0"));
        assert_eq!(e.key, "backends[1].weight", "{e}");
        let e = err(&GOOD.replace("weight = 3", "weight = 5000"));
        assert!(e.message.contains("1 to 1000"), "{e}");
        let e = err(&GOOD.replace("id = \"b\"", "id = \"\""));
        assert_eq!(e.key, "backends[1].id");
        let e = err(&GOOD.replace("id = \"b\"", "id = \"b/1\""));
        assert_eq!(e.key, "backends[1].id");
        assert!(e.message.contains("letters, digits"), "{e}");
        let long = format!("id = \"{}\"", "b".repeat(65));
        let e = err(&GOOD.replace("id = \"b\"", &long));
        assert!(e.message.contains("longer than 64"), "{e}");
        let longest = format!("id = \"{}\"", "b".repeat(64));
        assert!(parse(&GOOD.replace("id = \"b\"", &longest)).is_ok());
    }

    #[test]
    fn trusted_proxies_take_cidrs_or_addresses() {
        let with = |list: &str| {
            GOOD.replace(
                "[listener]",
                &format!("[listener]\ntrusted_proxies = [{list}]"),
            )
        };
        let c = Config::parse(&with("\"10.0.0.0/8\", \"::1\""), Path::new("t.toml"), None);
        let nets = c.expect("valid").listener.forwarding.trusted_proxies;
        assert_eq!(nets.len(), 2);
        let e = err(&with("\"10.0.0.0/33\""));
        assert_eq!(e.key, "listener.trusted_proxies", "{e}");
        assert!(e.message.contains("CIDR"), "{e}");
    }

    #[test]
    fn previous_secrets_are_checked_like_the_secret() {
        let src = GOOD.replace("[affinity]", "[affinity]\nprevious_secrets = [\"short\"]");
        let e = err(&src);
        assert_eq!(e.key, "affinity.previous_secrets", "{e}");
        assert!(e.message.contains("16 characters"), "{e}");
        let src = GOOD.replace(
            "[affinity]",
            "[affinity]\nprevious_secrets = [\"old-secret-0123456789\"]",
        );
        let c = Config::parse(&src, Path::new("t.toml"), None).expect("valid");
        assert_eq!(
            c.affinity.previous_secrets,
            vec![b"old-secret-0123456789".to_vec()]
        );
    }

    #[test]
    fn whole_file_errors() {
        let e = err("[listener]\naddress = \"127.0.0.1:1\"\n");
        assert_eq!(e.key, "backends");
        let e = err("[listener]\naddress = \"nope\"\n");
        assert_eq!((e.key.as_str(), e.line), ("listener.address", Some(2)));
        let e = err("not toml at all [");
        assert!(e.line.is_some());
        let e = err(&GOOD.replace("\"0123456789abcdef0123\"", "\"short\""));
        assert_eq!(e.key, "affinity.secret");
        let e = err(&format!("{GOOD}\n[affinity]\n"));
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn same_site_lists_valid_values() {
        let e = err(&GOOD.replace("[affinity]", "[affinity]\nsame_site = \"loose\""));
        assert_eq!(
            (e.key.as_str(), e.line),
            ("affinity.same_site", Some(6)),
            "{e}"
        );
        assert!(e.message.contains("`lax`, `strict`, `none`"), "{e}");
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(
            (c.limits.max_connections, c.limits.max_header_bytes),
            (10_000, 65_536)
        );
        let e = err(&format!("{GOOD}\n[limits]\nmax_header_bytes = 100\n"));
        assert_eq!(e.key, "limits.max_header_bytes");
        assert!(e.message.contains("8192 to 1048576"), "{e}");
        assert_eq!(
            err(&format!("{GOOD}\n[limits]\nmax_connections = 0\n")).key,
            "limits.max_connections"
        );
    }

    #[test]
    fn workers_are_bounded() {
        assert_eq!(
            parse(&format!("{GOOD}\n[runtime]\nworkers = 1\n"))
                .expect("valid")
                .workers,
            Some(1)
        );
        assert_eq!(parse(GOOD).expect("valid").workers, None);
        assert_eq!(
            err(&format!("{GOOD}\n[runtime]\nworkers = 0\n")).key,
            "runtime.workers"
        );
    }

    #[test]
    fn io_uring_is_on_unless_turned_off() {
        assert!(parse(GOOD).expect("valid").io_uring);
        let off = parse(&format!("{GOOD}\n[runtime]\nio_uring = false\n")).expect("valid");
        assert!(!off.io_uring);
        let e = err(&format!("{GOOD}\n[runtime]\nio_uring = \"yes\"\n"));
        assert_eq!(e.key, "runtime.io_uring", "{e}");
        assert!(e.message.contains("boolean"), "{e}");
    }

    #[test]
    fn a_reachable_admin_listener_needs_a_token() {
        let e = err(&format!("{GOOD}\n[admin]\naddress = \"0.0.0.0:9090\"\n"));
        assert_eq!(e.key, "admin.address", "{e}");
        assert!(e.message.contains("admin.token"), "{e}");
        let with_token =
            format!("{GOOD}\n[admin]\naddress = \"0.0.0.0:9090\"\ntoken = \"t0k3n\"\n");
        assert!(parse(&with_token)
            .expect("valid")
            .admin
            .is_some_and(|a| a.token.is_some()));
        let local = format!("{GOOD}\n[admin]\naddress = \"127.0.0.1:9090\"\n");
        assert!(parse(&local).expect("valid").admin.is_some());
        assert!(parse(GOOD).expect("valid").admin.is_none());
    }

    #[test]
    fn same_site_none_requires_secure() {
        let src = GOOD.replace("[affinity]", "[affinity]\nsame_site = \"none\"");
        assert_eq!(err(&src).key, "affinity.same_site");
        let src = GOOD.replace(
            "[affinity]",
            "[affinity]\nsame_site = \"none\"\nsecure = true",
        );
        assert!(parse(&src).is_ok());
    }
}
