//! Reading script replies and CBOR values; anything unexpected is a `BrokerError::Protocol`.

use dc_core::BrokerError;
use redis::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) fn bad(what: impl std::fmt::Display) -> BrokerError {
    BrokerError::Protocol(format!("unexpected reply from Redis: {what}").into())
}

pub(crate) fn array(v: Value) -> Result<Vec<Value>, BrokerError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(bad(format!("expected an array, got {other:?}"))),
    }
}

pub(crate) fn int(v: &Value) -> Result<i64, BrokerError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                bad(format!(
                    "expected a number, got {:?}",
                    String::from_utf8_lossy(b)
                ))
            }),
        Value::SimpleString(s) => s
            .parse()
            .map_err(|_| bad(format!("expected a number, got {s:?}"))),
        other => Err(bad(format!("expected a number, got {other:?}"))),
    }
}

pub(crate) fn uint<T: TryFrom<i64>>(v: &Value) -> Result<T, BrokerError> {
    let i = int(v)?;
    T::try_from(i).map_err(|_| bad(format!("number out of range: {i}")))
}

pub(crate) fn bytes(v: Value) -> Result<Vec<u8>, BrokerError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Okay => Ok(b"OK".to_vec()),
        other => Err(bad(format!("expected a string, got {other:?}"))),
    }
}

pub(crate) fn opt_bytes(v: Value) -> Result<Option<Vec<u8>>, BrokerError> {
    match v {
        Value::Nil => Ok(None),
        other => bytes(other).map(Some),
    }
}

pub(crate) fn string(v: Value) -> Result<String, BrokerError> {
    String::from_utf8(bytes(v)?).map_err(|e| bad(format!("not UTF-8: {e}")))
}

pub(crate) fn opt_string(v: Value) -> Result<Option<String>, BrokerError> {
    match v {
        Value::Nil => Ok(None),
        other => string(other).map(Some),
    }
}

pub(crate) fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, BrokerError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out)
        .map_err(|e| BrokerError::Protocol(format!("cannot encode a value as CBOR: {e}").into()))?;
    Ok(out)
}

pub(crate) fn from_cbor<T: DeserializeOwned>(what: &str, data: &[u8]) -> Result<T, BrokerError> {
    ciborium::from_reader(data).map_err(|e| {
        BrokerError::Protocol(
            format!(
                "{what} stored in Redis is not valid ({e}); was it written by another version?"
            )
            .into(),
        )
    })
}

/// Take the `n` first items of a reply, failing if it is shorter.
pub(crate) fn take<const N: usize>(v: Value) -> Result<[Value; N], BrokerError> {
    let items = array(v)?;
    let len = items.len();
    let mut it = items.into_iter();
    let mut out: [Value; N] = std::array::from_fn(|_| Value::Nil);
    for slot in out.iter_mut() {
        *slot = it
            .next()
            .ok_or_else(|| bad(format!("expected {N} items, got {len}")))?;
    }
    Ok(out)
}
