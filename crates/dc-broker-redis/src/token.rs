//! Join tokens: one line that tells a node or a pool where a head is, who to log in as, and
//! which certificate authority the head's TLS certificate must come from.
//!
//! ```text
//! dc1:<ca_sha256>:<user>:<secret>@<address>[,<address>…]:<port>
//! ```
//!
//! `ca_sha256` is 64 hex digits (the SHA-256 of the head's CA certificate), or `-` for a head
//! without TLS; `user` is letters, digits, `-` and `_`; the secret is percent-encoded outside
//! letters, digits and `-._~`; IPv6 addresses are in brackets. A client checks the head's
//! certificate against the hash before it sends the secret.

use crate::tls::{hex, parse_sha256};

/// The user nodes and pools log in as on a head's server.
pub const NODE_USER: &str = "dc-node";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Where the head listens, in the order to try.
    pub addresses: Vec<String>,
    /// The pool port.
    pub port: u16,
    /// The broker user.
    pub user: String,
    /// The user's secret.
    pub secret: String,
    /// The SHA-256 of the head's CA certificate; `None` for a head without TLS.
    pub ca_sha256: Option<[u8; 32]>,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("addresses", &self.addresses)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("secret", &"***")
            .field("ca_sha256", &self.ca_sha256.map(|h| hex(&h)))
            .finish()
    }
}

/// Why a token could not be read. The message never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a join token ({0}): expected dc1:<ca sha256>:<user>:<secret>@<address>:<port>, as `dc-cli token show` prints it"
)]
pub struct TokenError(&'static str);

fn user_ok(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn address_ok(address: &str) -> bool {
    !address.is_empty()
        && address.len() <= 253
        && (address.parse::<std::net::IpAddr>().is_ok()
            || address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
}

fn encode(secret: &str) -> String {
    let mut out = String::with_capacity(secret.len());
    for b in secret.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(pair, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl JoinToken {
    /// Read a token (surrounding whitespace ignored). Every field is checked: a token is input
    /// from outside.
    ///
    /// # Errors
    /// [`TokenError`] saying which part is wrong.
    ///
    /// # Examples
    /// ```
    /// use dc_broker_redis::token::JoinToken;
    ///
    /// let text = format!("dc1:{}:dc-node:s3cret@10.0.0.5,[fd00::5]:8899", "ab".repeat(32));
    /// let token = JoinToken::parse(&text).unwrap();
    /// assert_eq!(token.addresses, ["10.0.0.5", "fd00::5"]);
    /// assert_eq!((token.port, token.user.as_str(), token.secret.as_str()), (8899, "dc-node", "s3cret"));
    /// assert_eq!(token.to_string(), text);
    /// assert!(JoinToken::parse("dc1:nothex:dc-node:s@h:1").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<JoinToken, TokenError> {
        let text = text.trim();
        if text.len() > 4096 {
            return Err(TokenError("too long"));
        }
        let rest = text
            .strip_prefix("dc1:")
            .ok_or(TokenError("no dc1: prefix"))?;
        let (ca, rest) = rest.split_once(':').ok_or(TokenError("no CA hash"))?;
        let ca_sha256 = match ca {
            "-" => None,
            hash => Some(parse_sha256(hash).ok_or(TokenError("the CA hash is not 64 hex digits"))?),
        };
        let (user, rest) = rest.split_once(':').ok_or(TokenError("no user"))?;
        if !user_ok(user) {
            return Err(TokenError("the user is not letters, digits, '-' and '_'"));
        }
        let (secret, place) = rest
            .rsplit_once('@')
            .ok_or(TokenError("no '@' before the address"))?;
        let secret = decode(secret).ok_or(TokenError("the secret is not percent-encoded text"))?;
        if secret.is_empty() || secret.chars().any(char::is_control) {
            return Err(TokenError(
                "the secret is empty or holds control characters",
            ));
        }
        let (addresses, port) = place.rsplit_once(':').ok_or(TokenError("no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(TokenError("the port is not a number from 1 to 65535"))?;
        let addresses: Vec<String> = addresses
            .split(',')
            .map(|a| {
                a.strip_prefix('[')
                    .and_then(|a| a.strip_suffix(']'))
                    .unwrap_or(a)
                    .to_string()
            })
            .collect();
        if addresses.len() > 16 || !addresses.iter().all(|a| address_ok(a)) {
            return Err(TokenError("an address is not an IP address or a host name"));
        }
        Ok(JoinToken {
            addresses,
            port,
            user: user.to_string(),
            secret,
            ca_sha256,
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ca = self
            .ca_sha256
            .map(|h| hex(&h))
            .unwrap_or_else(|| "-".into());
        let addresses: Vec<String> = self
            .addresses
            .iter()
            .map(|a| {
                if a.contains(':') {
                    format!("[{a}]")
                } else {
                    a.clone()
                }
            })
            .collect();
        write!(
            f,
            "dc1:{ca}:{}:{}@{}:{}",
            self.user,
            encode(&self.secret),
            addresses.join(","),
            self.port
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            addresses: vec!["head.lan".into(), "::1".into(), "10.1.2.3".into()],
            port: 8899,
            user: NODE_USER.into(),
            secret: "p@ss:w/rd %20 é".into(),
            ca_sha256: Some([7; 32]),
        }
    }

    #[test]
    fn a_token_round_trips_whatever_its_secret_holds() {
        let t = token();
        let text = t.to_string();
        assert!(!text.contains(' '), "one word on a command line: {text}");
        assert_eq!(JoinToken::parse(&text), Ok(t.clone()));
        assert_eq!(JoinToken::parse(&format!("  {text}\n")), Ok(t));
        let plain = JoinToken {
            ca_sha256: None,
            ..token()
        };
        assert_eq!(JoinToken::parse(&plain.to_string()), Ok(plain));
    }

    #[test]
    fn damaged_tokens_are_refused_without_echoing_the_secret() {
        let good = token().to_string();
        let bad = [
            String::new(),
            "dc2:".into(),
            good.replace("dc1:", ""),
            good.replacen(":dc-node:", ":dc node:", 1),
            good.replace(":8899", ":0"),
            good.replace(":8899", ":70000"),
            good.replace(":8899", ""),
            good.replace("head.lan", "head lan"),
            good.replace("head.lan", "head\nlan"),
            good.replace("%40", "%4"),
            good.replace("%40", "%ZZ"),
            "x".repeat(5000),
        ];
        for text in bad {
            let e = JoinToken::parse(&text).expect_err(&text);
            assert!(!e.to_string().contains("ss:w"), "{e}");
        }
        assert!(!format!("{:?}", token()).contains("ss:w"));
    }
}
