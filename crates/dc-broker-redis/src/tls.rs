//! TLS on the pool port: how a client decides to trust a server, the head's certificates, and
//! the known-heads file of trust on first use.
//!
//! A head node makes its own certificate authority (CA) once, in its state directory, and a
//! server certificate signed by it. Clients that know the head's CA by its SHA-256 (from a join
//! token) pin it: the connection goes on only when the server's chain holds that CA and the
//! server certificate is signed by it, whatever address the client used. Clients that know only
//! a password pin the CA the head shows the first time, in a known-heads file
//! ([`TlsTrust::KnownHeads`]), and refuse a different one later. Brokers with certificates from a
//! public or private CA (`rediss://`) are checked the usual way, by name.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dc_core::util::lock;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// The name every head's server certificate carries. Pinned connections check the chain
/// against it rather than against the address they dialled, so a head is reached by any of
/// its addresses (a public IP, a LAN name, a tunnel).
pub const HEAD_NAME: &str = "dc-head";

/// The environment variable naming the known-heads file (default
/// `$XDG_CONFIG_HOME/distributed-computing/known_heads`, else under `~/.config`).
pub const KNOWN_HEADS_ENV: &str = "DC_KNOWN_HEADS";

/// How a TLS connection decides to trust the server it reached.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsTrust {
    /// The system's root certificates; the server's name must match the URL's host (a
    /// managed Redis with a public certificate).
    System,
    /// Only the CA certificates in this PEM file; the name must match (a private CA).
    CaFile(PathBuf),
    /// A head whose CA certificate has this SHA-256, as a join token names it.
    PinnedCa([u8; 32]),
    /// Trust on first use: the CA a head shows the first time is recorded in this file under
    /// the `host:port` dialled; later connections must see the same one.
    KnownHeads(PathBuf),
}

/// The SHA-256 of `der`.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from 64 hex digits (either case).
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The known-heads file this process uses: `DC_KNOWN_HEADS`, else
/// `$XDG_CONFIG_HOME/distributed-computing/known_heads`, else `~/.config/…`.
pub fn default_known_heads() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(KNOWN_HEADS_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })?;
    Some(config.join("distributed-computing").join("known_heads"))
}

/// The known-heads entry for `key` (`host:port`): its line number (from 1) and CA hash. The
/// file is read as untrusted text: lines that are not `host:port <64 hex digits>` are skipped.
pub fn known_head(file: &Path, key: &str) -> std::io::Result<Option<(usize, [u8; 32])>> {
    let text = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if text.len() > 16 << 20 {
        return Err(std::io::Error::other(format!(
            "{} is over 16 MiB: not a known-heads file",
            file.display()
        )));
    }
    let text = String::from_utf8_lossy(&text);
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let (Some(host), Some(hash)) = (words.next(), words.next()) else {
            continue;
        };
        if host == key
            && let Some(hash) = parse_sha256(hash.trim_start_matches("sha256:"))
        {
            return Ok(Some((i + 1, hash)));
        }
    }
    Ok(None)
}

/// Append `key sha256:<hash>` to the known-heads file (made 0600, its directory 0700).
fn record_known_head(file: &Path, key: &str, hash: &[u8; 32]) -> std::io::Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)?;
    writeln!(f, "{key} sha256:{}", hex(hash))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a TLS client needs: its rustls config, the name it asks for, and (trust on first use)
/// where to record what it saw.
#[derive(Clone)]
pub(crate) struct TlsClient {
    config: Arc<ClientConfig>,
    /// The name sent and checked: the URL's host, or [`HEAD_NAME`] for pinned heads.
    name: ServerName<'static>,
    first_use: Option<Arc<FirstUse>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Trust on first use: the file, the key, and the CA hash the last handshake saw.
#[derive(Debug)]
struct FirstUse {
    file: PathBuf,
    key: String,
    seen: Mutex<Option<[u8; 32]>>,
}

impl TlsClient {
    /// A client for `host:port` trusting servers as `trust` says.
    pub(crate) fn new(trust: &TlsTrust, host: &str, port: u16) -> Result<Self, String> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        let by_name = |roots: RootCertStore| -> Result<Self, String> {
            let name = ServerName::try_from(host.to_string())
                .map_err(|_| format!("{host} is not a name a TLS certificate can hold"))?;
            let config = builder
                .clone()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(TlsClient {
                config: Arc::new(config),
                name,
                first_use: None,
            })
        };
        let head_name = || {
            ServerName::try_from(HEAD_NAME).map_err(|_| "the head's certificate name".to_string())
        };
        match trust {
            TlsTrust::System => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(
                        "no system root certificates found: name the broker's CA with --tls-ca FILE"
                            .into(),
                    );
                }
                by_name(roots)
            }
            TlsTrust::CaFile(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "CA file {} holds no usable certificate",
                        path.display()
                    ));
                }
                by_name(roots)
            }
            TlsTrust::PinnedCa(hash) => {
                let verifier = HeadVerifier {
                    provider: provider.clone(),
                    pin: Pin::Token(*hash),
                    first_use: None,
                };
                let config = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth();
                Ok(TlsClient {
                    config: Arc::new(config),
                    name: head_name()?,
                    first_use: None,
                })
            }
            TlsTrust::KnownHeads(file) => {
                let key = format!("{host}:{port}");
                let first_use = Arc::new(FirstUse {
                    file: file.clone(),
                    key: key.clone(),
                    seen: Mutex::new(None),
                });
                let verifier = HeadVerifier {
                    provider: provider.clone(),
                    pin: Pin::KnownHeads {
                        file: file.clone(),
                        key,
                    },
                    first_use: Some(first_use.clone()),
                };
                let config = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth();
                Ok(TlsClient {
                    config: Arc::new(config),
                    name: head_name()?,
                    first_use: Some(first_use),
                })
            }
        }
    }

    /// The TLS handshake over `tcp`.
    pub(crate) async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
    }

    /// After a connection was made and authenticated: record the CA it saw if the known-heads
    /// file has no entry for this head yet.
    pub(crate) fn connected(&self) {
        let Some(first) = &self.first_use else {
            return;
        };
        let Some(seen) = *lock(&first.seen) else {
            return;
        };
        static WRITING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = lock(&WRITING);
        match known_head(&first.file, &first.key) {
            Ok(Some(_)) => {}
            Ok(None) => match record_known_head(&first.file, &first.key, &seen) {
                Ok(()) => tracing::info!(
                    head = %first.key,
                    ca_sha256 = %hex(&seen),
                    file = %first.file.display(),
                    "first connection to this head: its certificate is recorded and will be required from now on"
                ),
                Err(e) => tracing::warn!(
                    file = %first.file.display(),
                    error = %e,
                    "cannot record the head's certificate; it will be trusted again on the next first use"
                ),
            },
            Err(e) => {
                tracing::warn!(file = %first.file.display(), error = %e, "cannot read the known-heads file")
            }
        }
    }
}

/// The handshake-signature checks of a verifier with a `provider` field: the provider's own
/// algorithms, the same for every verifier here (only who is trusted differs).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Which CA a head must show.
#[derive(Debug)]
enum Pin {
    /// The one a join token names.
    Token([u8; 32]),
    /// The one recorded for `key` in `file`; any self-consistent one on first use.
    KnownHeads { file: PathBuf, key: String },
}

/// Checks a head's chain: its CA by hash, and the server certificate signed by that CA for
/// [`HEAD_NAME`].
#[derive(Debug)]
struct HeadVerifier {
    provider: Arc<CryptoProvider>,
    pin: Pin,
    first_use: Option<Arc<FirstUse>>,
}

/// The first words of every refusal of a head's certificate (so callers can tell it from other
/// TLS errors).
pub(crate) const REFUSED: &str = "refusing the head's certificate";

impl ServerCertVerifier for HeadVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |why: String| rustls::Error::General(format!("{REFUSED}: {why}"));
        let shown: Vec<[u8; 32]> = intermediates.iter().map(|c| sha256(c)).collect();
        let (ca, hash) = match &self.pin {
            Pin::Token(want) => {
                let at = shown.iter().position(|h| h == want).ok_or_else(|| {
                    refuse(format!(
                        "its CA is not the one the join token names (sha256 {}); the server \
                         shows {}",
                        hex(want),
                        shown
                            .first()
                            .map(|h| hex(h))
                            .unwrap_or_else(|| "no CA".into())
                    ))
                })?;
                (&intermediates[at], *want)
            }
            Pin::KnownHeads { file, key } => {
                let recorded = known_head(file, key).map_err(|e| {
                    refuse(format!(
                        "cannot read the known-heads file {}: {e}",
                        file.display()
                    ))
                })?;
                match recorded {
                    Some((line, want)) => match shown.iter().position(|h| *h == want) {
                        Some(at) => (&intermediates[at], want),
                        None => {
                            return Err(refuse(format!(
                                "the head at {key} shows a certificate (CA sha256 {}) other \
                                 than the one recorded for it in {} line {line} (sha256 {}). \
                                 If that head was set up anew, remove line {line} from that \
                                 file and connect again; if not, someone may be intercepting \
                                 the connection",
                                shown
                                    .last()
                                    .map(|h| hex(h))
                                    .unwrap_or_else(|| "none".into()),
                                file.display(),
                                hex(&want)
                            )));
                        }
                    },
                    None => {
                        let at = intermediates.len().checked_sub(1).ok_or_else(|| {
                            refuse(format!("the server at {key} shows no CA certificate"))
                        })?;
                        (&intermediates[at], shown[at])
                    }
                }
            }
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| refuse(format!("its CA certificate is unusable: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| refuse(format!("{e}")))?;
        let name = ServerName::try_from(HEAD_NAME).map_err(|e| refuse(format!("{e}")))?;
        inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
            .map_err(|e| refuse(format!("its server certificate does not check out: {e}")))?;
        if let Some(first) = &self.first_use {
            *lock(&first.seen) = Some(hash);
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Why a TLS handshake failed, in words for the user: a refused certificate (not worth a
/// retry), or `None` for anything else.
pub(crate) fn refusal(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::General(text) if text.starts_with(REFUSED) => Some(text.clone()),
        rustls::Error::InvalidCertificate(why) => {
            Some(format!("the server's certificate was refused: {why:?}"))
        }
        _ => None,
    }
}

/// Whether a handshake failed because the peer does not speak TLS.
pub(crate) fn not_tls(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(_))
    )
}

// ---- is a pool server there? -------------------------------------------------------------

/// Accepts any certificate: only for [`answers_over_tls`], which sends no secret and trusts
/// nothing it reads beyond the shape of one reply.
#[derive(Debug)]
struct AnyServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Whether a Redis that asks for a password answers over TLS on `127.0.0.1:port` (a `PING`
/// refused with `-NOAUTH`), within about `timeout` per step. Blocking; sends no secret.
pub fn answers_over_tls(port: u16, timeout: std::time::Duration) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(tcp) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let provider = provider();
    let Ok(builder) =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()
    else {
        return false;
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer { provider }))
        .with_no_client_auth();
    let Ok(name) = ServerName::try_from(HEAD_NAME) else {
        return false;
    };
    let Ok(conn) = rustls::ClientConnection::new(Arc::new(config), name) else {
        return false;
    };
    asks_for_password(&mut rustls::StreamOwned::new(conn, tcp))
}

/// Whether a Redis that asks for a password answers in plain text on `127.0.0.1:port` (a
/// `PING` refused with `-NOAUTH`), within about `timeout` per step. Blocking; sends no secret.
pub fn answers_plain(port: u16, timeout: std::time::Duration) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    asks_for_password(&mut tcp)
}

/// Send `PING` and read whether the server refuses it for want of a password (`-NOAUTH`): a
/// Redis that requires one, and nothing else, answers so.
fn asks_for_password(stream: &mut (impl std::io::Read + std::io::Write)) -> bool {
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"-NOAUTH"),
        Err(_) => false,
    }
}

// ---- the head's certificates ---------------------------------------------------------------

/// A head's TLS files in its state directory.
#[derive(Debug, Clone)]
pub struct HeadCerts {
    /// The CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The server certificate followed by the CA's (PEM): what the server shows.
    pub chain: PathBuf,
    /// The server's private key (PEM, 0600).
    pub key: PathBuf,
    /// The SHA-256 of the CA certificate (DER): what join tokens and known-heads files pin.
    pub ca_sha256: [u8; 32],
}

/// The head's CA and server certificate in `dir`: made once (keys 0600) and kept, so pins stay
/// valid across restarts. When any of the files is missing or unreadable, all are made anew
/// (a new CA: tokens and known-heads entries must then be renewed).
pub fn head_certs(dir: &Path) -> std::io::Result<HeadCerts> {
    let ca_cert = dir.join("tls-ca.crt");
    let ca_key = dir.join("tls-ca.key");
    let chain = dir.join("tls-server.crt");
    let key = dir.join("tls-server.key");
    let existing = || -> Option<[u8; 32]> {
        if !key.is_file() || !ca_key.is_file() || !chain.is_file() {
            return None;
        }
        let ca = CertificateDer::from_pem_file(&ca_cert).ok()?;
        let chain_certs: Vec<_> = CertificateDer::pem_file_iter(&chain)
            .ok()?
            .collect::<Result<_, _>>()
            .ok()?;
        (chain_certs.len() == 2 && chain_certs[1] == ca).then(|| sha256(&ca))
    };
    if let Some(ca_sha256) = existing() {
        return Ok(HeadCerts {
            ca_cert,
            chain,
            key,
            ca_sha256,
        });
    }
    let made =
        |e: rcgen::Error| std::io::Error::other(format!("cannot make TLS certificates: {e}"));
    let host = crate::server::host_name_for_certs();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("distributed-computing head CA ({host})"),
    );
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_keys = rcgen::KeyPair::generate().map_err(made)?;
    let ca = ca_params.self_signed(&ca_keys).map_err(made)?;

    let mut names = vec![HEAD_NAME.to_string(), "localhost".into()];
    if rcgen::Ia5String::try_from(host.clone()).is_ok() && !host.is_empty() {
        names.push(host.clone());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(made)?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    params.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv6Addr::LOCALHOST.into(),
    ));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("distributed-computing head ({host})"),
    );
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let server_keys = rcgen::KeyPair::generate().map_err(made)?;
    let server = params
        .signed_by(&server_keys, &ca, &ca_keys)
        .map_err(made)?;

    crate::server::write_new_file(dir, "tls-ca.key", ca_keys.serialize_pem().as_bytes())?;
    crate::server::write_new_file(
        dir,
        "tls-server.key",
        server_keys.serialize_pem().as_bytes(),
    )?;
    crate::server::write_new_file(
        dir,
        "tls-server.crt",
        format!("{}{}", server.pem(), ca.pem()).as_bytes(),
    )?;
    crate::server::write_new_file(dir, "tls-ca.crt", ca.pem().as_bytes())?;
    tracing::info!(dir = %dir.display(), ca_sha256 = %hex(&sha256(ca.der())), "made the head's TLS certificates");
    Ok(HeadCerts {
        ca_cert,
        chain,
        key,
        ca_sha256: sha256(ca.der()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_round_trips() {
        let h = sha256(b"abc");
        assert_eq!(
            hex(&h),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_sha256(&hex(&h)), Some(h));
        assert_eq!(parse_sha256(&hex(&h).to_uppercase()), Some(h));
        assert_eq!(parse_sha256("ab"), None);
        assert_eq!(parse_sha256(&"g".repeat(64)), None);
        assert_eq!(parse_sha256(&"é".repeat(32)), None);
    }

    #[test]
    fn known_heads_skips_junk_and_finds_the_entry() {
        let dir = std::env::temp_dir().join(format!("dc-known-heads-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("sub").join("known_heads");
        assert_eq!(known_head(&file, "h:1").ok(), Some(None));
        let h = sha256(b"x");
        record_known_head(&file, "h:1", &h).expect("record");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(b"garbage\n\xff\xfe\nh:2 nothex\nh:2 sha256:00\n"))
            .expect("append junk");
        record_known_head(&file, "h:2", &h).expect("record");
        assert_eq!(known_head(&file, "h:1").ok(), Some(Some((1, h))));
        assert_eq!(known_head(&file, "h:2").ok(), Some(Some((6, h))));
        assert_eq!(known_head(&file, "h:3").ok(), Some(None));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the known-heads file is private");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn head_certs_are_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("dc-head-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let first = head_certs(&dir).expect("made");
        let again = head_certs(&dir).expect("kept");
        assert_eq!(first.ca_sha256, again.ca_sha256);
        std::fs::remove_file(&first.key).expect("remove key");
        let renewed = head_certs(&dir).expect("made anew");
        assert_ne!(first.ca_sha256, renewed.ca_sha256);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
