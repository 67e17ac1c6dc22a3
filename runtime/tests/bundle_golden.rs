//! Golden vectors: fixed keys and a fixed manifest whose encoded bytes and
//! signatures are pinned here. If one of these fails, the wire format changed
//! (a field added, reordered or retyped — in the manifest, the certificate,
//! `ModelSignature`, `TensorData` or the drift `ReferenceSketch`). Devices in
//! the field would read the new bytes wrongly, so: bump the format number of
//! what changed (`MANIFEST_FORMAT`, `CERTIFICATE_FORMAT`, `CONTAINER_FORMAT`),
//! keep reading the old one where devices need it, and only then replace the
//! vectors below with the values the failure prints.

mod bundle_common;

use bundle_common::*;
use outpost_runtime::bundle::{
    signing_message, verify_bundle_bytes, Digest, Manifest, PublicKey, SignatureBytes, Signed, SignedPayload,
};

/// The keys: ed25519 from fixed seeds (RFC 8032 key derivation).
const ROOT_PUBLIC: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
const ROOT_KEY_ID: &str = "34750f98bd59fcfc";
const ONLINE_PUBLIC: &str = "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394";
const ONLINE_KEY_ID: &str = "6a3803d5f059902a";

/// postcard bytes of the certificate body the root signs.
const CERTIFICATE_PAYLOAD: &str = "0100016a3803d5f059902a8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b39480e2cfaa0680c9d4b906";
const CERTIFICATE_SIGNATURE: &str = "d1f333fa16bcf6409388047501ff00a19fa6285e8e7db308df72e0b967d7dc23dba619762108d078f60954c678339f58355c2709f5cde1b72415d0b89c66600f";

/// postcard bytes of the manifest from `bundle_common::manifest`.
const MANIFEST_PAYLOAD: &str = "0106676f6c64656e05312e322e332a00b4e2f16eaed164610f6e30a6e2b33fcffa971ba0e00dbeb8641607157b3ba9c240010178000200010201056c6162656c04010002016100030000003f000020400100604004000202000001040000003f00006040000000000000004091348acbe9a7f43f01620003000020410000f04101002042040002020000010400002041000020420000000000003940b5c16c3ee4d1294001056c6162656c0102000203020200000017b7d1386f12833a010102010200020000003f00002041010101040100d8e6cfaa06";
const MANIFEST_SIGNATURE: &str = "50d12eae0e96b16b013be3807f94123ef829e1123421f8c450080756c0ed2ae9c5a836672f301ebc21e28333dd8943282365d084b51421a5a53b3bb499b6a005";

/// sha256 of the whole `.outpost` file for that manifest, its certificate and
/// the 64-byte fake model.
const BUNDLE_SHA256: &str = "d10f49a9388d631f95465a2e256a89cbec52cfa9ae6985ff03fcec8adf587fd1";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check(what: &str, expected: &str, actual: &str) {
    assert_eq!(expected, actual, "golden vector {what} changed; see the comment at the top of this file.\nnew value: {actual}");
}

fn golden_manifest() -> (Manifest, Vec<u8>) {
    let model = fake_model(64);
    (manifest("golden", "1.2.3", 42, &model), model)
}

#[test]
fn keys_from_fixed_seeds() {
    check("root public key", ROOT_PUBLIC, &hex(&root_key().public_key().to_bytes()));
    check("root key id", ROOT_KEY_ID, &root_key().key_id().to_hex());
    check("online public key", ONLINE_PUBLIC, &hex(&online_key().public_key().to_bytes()));
    check("online key id", ONLINE_KEY_ID, &online_key().key_id().to_hex());
}

#[test]
fn certificate_bytes_and_signature() {
    let cert = certificate();
    check("certificate payload", CERTIFICATE_PAYLOAD, &hex(cert.payload()));
    check("certificate signature", CERTIFICATE_SIGNATURE, &hex(&cert.signature().0));
    // The format number is the first byte (varint 1), then the role (0 = online).
    assert_eq!(&cert.payload()[..2], &[1, 0]);
}

#[test]
fn manifest_bytes_and_signature() {
    let (manifest, _) = golden_manifest();
    let signed = signer().sign(&manifest).expect("sign");
    check("manifest payload", MANIFEST_PAYLOAD, &hex(signed.payload()));
    check("manifest signature", MANIFEST_SIGNATURE, &hex(&signed.signature().0));
    // Format number first, then the name as a length-prefixed string.
    assert_eq!(&signed.payload()[..8], b"\x01\x06golden");
    // The signature covers exactly the payload bytes behind the fixed
    // domain-separation context, and checks out with plain ed25519.
    let message = signing_message(Manifest::KIND, signed.payload());
    assert_eq!(&message[..message.len() - signed.payload().len()], b"outpost-signature-v1\0manifest\0");
    assert!(online_key().public_key().verify(&message, signed.signature()));
}

#[test]
fn golden_vectors_decode_and_verify() {
    // The pinned bytes, not freshly encoded ones, must still verify and
    // decode to the same manifest: this is what a device in the field holds.
    let (manifest, model) = golden_manifest();
    let online = PublicKey::from_bytes(&from_hex(ONLINE_PUBLIC).try_into().expect("32 bytes")).expect("key");
    let signed: Signed<Manifest> = Signed::from_parts(
        from_hex(MANIFEST_PAYLOAD),
        online.key_id(),
        SignatureBytes(from_hex(MANIFEST_SIGNATURE).try_into().expect("64 bytes")),
    );
    let decoded = signed.open(&online, &Default::default()).expect("golden manifest verifies");
    assert_eq!(decoded, manifest);

    let mut bundle = Vec::new();
    outpost_runtime::bundle::write_bundle(&mut bundle, &signed, &[certificate()], &model).expect("write");
    check("bundle sha256", BUNDLE_SHA256, &Digest::of(&bundle).to_hex());
    let verified = verify_bundle_bytes(&bundle, &trust(), &options()).expect("golden bundle verifies");
    assert_eq!(verified.header.value, manifest);
    assert_eq!(verified.model, model);
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}
