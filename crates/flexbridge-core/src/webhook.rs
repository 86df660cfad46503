//! The request as the ingress hands it over, and the typestate that proves it was verified.

use std::time::SystemTime;

/// One received webhook: its decoded parameters in arrival order (repeated names kept), the
/// idempotency token Twilio sends with every delivery, and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRequest {
    /// Decoded parameters, in the order they arrived.
    pub params: Vec<(String, String)>,
    /// `I-Twilio-Idempotency-Token`: the same on Twilio's retries of one delivery.
    pub idempotency_token: Option<String>,
    /// Receipt time; it becomes the CloudEvent `time` (Interactions payloads carry none).
    pub received_at: SystemTime,
}

/// Why a spool record cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt spool record: {0}")]
pub struct RecordError(&'static str);

impl WebhookRequest {
    /// The spool record of this request: receipt time, token and parameters, each string
    /// preceded by its length. Written from references: nothing is cloned.
    pub fn encode(&self) -> Vec<u8> {
        let strings: usize = self.params.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let token = self.idempotency_token.as_deref();
        let mut out = Vec::with_capacity(1 + 8 + 5 + token.map_or(0, str::len) + 4 + strings);
        out.push(1); // format version
        let nanos = self
            .received_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        out.extend_from_slice(&nanos.to_be_bytes());
        match token {
            Some(token) => {
                out.push(1);
                put(&mut out, token);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.params.len() as u32).to_be_bytes());
        for (name, value) in &self.params {
            put(&mut out, name);
            put(&mut out, value);
        }
        out
    }

    /// Reads a record written by [`WebhookRequest::encode`].
    pub fn decode(mut bytes: &[u8]) -> Result<Self, RecordError> {
        if take(&mut bytes, 1)? != [1] {
            return Err(RecordError("unknown format version"));
        }
        let nanos = u64::from_be_bytes(take_array(&mut bytes)?);
        let received_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos);
        let idempotency_token = match take(&mut bytes, 1)? {
            [0] => None,
            [1] => Some(take_string(&mut bytes)?),
            _ => return Err(RecordError("bad token flag")),
        };
        let count = u32::from_be_bytes(take_array(&mut bytes)?) as usize;
        let mut params = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let name = take_string(&mut bytes)?;
            params.push((name, take_string(&mut bytes)?));
        }
        if !bytes.is_empty() {
            return Err(RecordError("trailing bytes"));
        }
        Ok(Self {
            params,
            idempotency_token,
            received_at,
        })
    }
}

fn put(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], RecordError> {
    if bytes.len() < n {
        return Err(RecordError("truncated"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_array<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N], RecordError> {
    let mut array = [0u8; N];
    array.copy_from_slice(take(bytes, N)?);
    Ok(array)
}

fn take_string(bytes: &mut &[u8]) -> Result<String, RecordError> {
    let len = u32::from_be_bytes(take_array(bytes)?) as usize;
    String::from_utf8(take(bytes, len)?.to_vec()).map_err(|_| RecordError("invalid UTF-8"))
}

/// How a request came to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attestation {
    /// `X-Twilio-Signature` matched with an Auth Token (HMAC-SHA1).
    AuthToken,
    /// `X-Twilio-Signature` matched with a SharedKey (HMAC-SHA256).
    SharedKey,
    /// Signature verification is switched off by configuration.
    VerificationDisabled,
    /// Read back from the local spool, which only ever holds requests verified on arrival.
    Spooled,
}

/// A value that a verifier has vouched for. Normalization only accepts `Verified` requests,
/// so the compiler stops an unverified request from reaching a sink.
#[derive(Debug, Clone)]
pub struct Verified<T> {
    inner: T,
    attestation: Attestation,
}

impl<T> Verified<T> {
    /// Marks `inner` as verified. Only a verifier calls this (the ingress crate's signature
    /// check, or a test); grep for it when auditing the trust boundary.
    pub fn attest(inner: T, attestation: Attestation) -> Self {
        Self { inner, attestation }
    }

    /// How the value was verified.
    pub fn attestation(&self) -> Attestation {
        self.attestation
    }

    /// Read access to the verified value.
    pub fn get(&self) -> &T {
        &self.inner
    }

    /// Gives up the proof and returns the value.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_round_trip_and_damage_is_an_error() {
        let request = WebhookRequest {
            params: vec![
                ("EventType".into(), "onChannelCreated".into()),
                ("A".into(), "ñ \u{0}".into()),
                ("A".into(), String::new()),
            ],
            idempotency_token: Some("tok".into()),
            received_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_796_000_000_123_456_789),
        };
        let bytes = request.encode();
        assert_eq!(WebhookRequest::decode(&bytes), Ok(request.clone()));
        let without = WebhookRequest {
            idempotency_token: None,
            ..request
        };
        assert_eq!(WebhookRequest::decode(&without.encode()), Ok(without));
        for cut in 0..bytes.len() {
            assert!(
                WebhookRequest::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(WebhookRequest::decode(&longer).is_err());
    }
}
