//! Key and certificate files: the documented text format, mode 0600 for
//! secrets (and refusal of readable ones), no secret in Debug output.

use std::path::PathBuf;

use outpost_runtime::bundle::{
    issue_certificate, read_certificate_file, write_certificate_file, KeyError, PublicKey, SecretKey, Signer,
    TrustRoot,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-bundle-keys-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn key_files_round_trip_with_safe_permissions() {
    let dir = temp_dir("roundtrip");
    let key = SecretKey::generate().expect("random key");
    key.write_file(dir.join("online.key"), "outpost online signing key").expect("write secret");
    key.public_key().write_file(dir.join("online.pub"), "outpost online public key").expect("write public");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("online.key")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let back = SecretKey::read_file(dir.join("online.key")).expect("read secret");
    assert_eq!(back.key_id(), key.key_id());
    assert_eq!(PublicKey::read_file(dir.join("online.pub")).expect("read public"), key.public_key());

    let text = std::fs::read_to_string(dir.join("online.pub")).expect("text");
    assert!(text.contains("outpost-ed25519-public-v1 "));
    assert!(text.contains(&key.key_id().to_hex()));

    // A public key where the trust root is expected works; a secret one is
    // refused with a message that says what is wrong.
    TrustRoot::read_file(dir.join("online.pub")).expect("trust from .pub");
    match TrustRoot::read_file(dir.join("online.key")) {
        Err(KeyError::WrongKind { found: "secret", .. }) => {}
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn readable_secret_keys_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("perms");
    let path = dir.join("root.key");
    SecretKey::generate().expect("key").write_file(&path, "root").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(matches!(SecretKey::read_file(&path), Err(KeyError::InsecurePermissions { mode: 0o644, .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generated_keys_differ_and_never_print_their_secret() {
    let a = SecretKey::generate().expect("key");
    let b = SecretKey::generate().expect("key");
    assert_ne!(a.key_id(), b.key_id());
    let dir = temp_dir("debug");
    a.write_file(dir.join("a.key"), "a").expect("write");
    let text = std::fs::read_to_string(dir.join("a.key")).expect("read");
    let secret_hex = text.lines().last().and_then(|l| l.split(' ').nth(1)).expect("key line").to_string();
    assert_eq!(secret_hex.len(), 64);
    assert!(!format!("{a:?}").contains(&secret_hex));
    let cert = issue_certificate(&b, &a.public_key(), 1, 0, 10).expect("cert");
    let signer = Signer::new(a, cert).expect("signer");
    assert!(!format!("{signer:?}").contains(&secret_hex));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn certificate_files_round_trip() {
    let dir = temp_dir("cert");
    let root = SecretKey::generate().expect("key");
    let online = SecretKey::generate().expect("key");
    let cert = issue_certificate(&root, &online.public_key(), 4, 1_000, 2_000).expect("cert");
    write_certificate_file(dir.join("online.cert"), &cert).expect("write");
    let back = read_certificate_file(dir.join("online.cert")).expect("read");
    assert_eq!(back, cert);
    std::fs::write(dir.join("big.cert"), vec![0u8; 10_000]).expect("write");
    assert!(read_certificate_file(dir.join("big.cert")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_key_files_are_refused() {
    let dir = temp_dir("malformed");
    for (name, text) in [
        ("empty.pub", ""),
        ("short.pub", "outpost-ed25519-public-v1 abcd\n"),
        ("tag.pub", "ssh-ed25519 AAAA\n"),
        ("two.pub", "outpost-ed25519-public-v1 00\noutpost-ed25519-public-v1 00\n"),
    ] {
        std::fs::write(dir.join(name), text).expect("write");
        assert!(PublicKey::read_file(dir.join(name)).is_err(), "{name}");
    }
    std::fs::write(dir.join("huge.pub"), "#".repeat(100_000)).expect("write");
    assert!(matches!(PublicKey::read_file(dir.join("huge.pub")), Err(KeyError::TooLarge { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}
