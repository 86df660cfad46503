//! The signature check: line 1 the URL, line 2 `X-Twilio-Signature`, line 3
//! `X-Twilio-Webhooks-Signature-Settings` (empty: none), the rest the form body. Every URL
//! variant (ports, schemes, IPv6 hosts, odd authorities) goes through `url_variants`.
#![no_main]
use flexbridge_core::Secret;
use flexbridge_ingress::signature::{Signed, Verifier};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(4, '\n');
    let url = lines.next().unwrap_or("");
    let signature = lines.next().unwrap_or("");
    let settings = lines.next().filter(|s| !s.is_empty());
    let body = lines.next().unwrap_or("");
    let params = flexbridge_ingress::form::parse(body.as_bytes()).unwrap_or_default();
    let verifier = Verifier::new(
        vec![Secret::new("fuzz-token")],
        BTreeMap::from([("k1".to_owned(), Secret::new("fuzz-shared"))]),
    );
    for json_body in [None, Some(body.as_bytes())] {
        let _ = verifier.check(&Signed {
            url,
            params: &params,
            json_body,
            signature: Some(signature),
            settings,
        });
    }
    // A signature computed by the crate over these inputs verifies.
    let signed = flexbridge_ingress::signature::sign(
        flexbridge_ingress::signature::Algorithm::HmacSha1,
        "fuzz-token",
        url,
        &params,
    );
    let ok = verifier.check(&Signed {
        url,
        params: &params,
        json_body: None,
        signature: Some(&signed),
        settings: None,
    });
    assert!(ok.is_ok(), "{url:?}: {ok:?}");
});
