//! The container image: no container engine runs here, so the test runs the image's build
//! steps (`deploy/image/build.sh`, which the Dockerfile calls) on the binary the suite built,
//! then starts the packaged binary with the environment the Dockerfile sets, and checks the
//! Dockerfile and the script agree (paths, user, entry point).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flexbridge_e2e::binary;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `ENV` pairs of the runtime stage.
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let joined = runtime.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

#[test]
fn the_image_build_steps_produce_a_binary_that_runs_in_the_runtime_image() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    // The Dockerfile runs the script under test and ships what it produced.
    assert!(
        dockerfile.contains("deploy/image/build.sh /out"),
        "{dockerfile}"
    );
    assert!(dockerfile.contains("COPY --from=build /out/ /"));
    assert!(dockerfile.contains("cargo/registry"));
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "runs as {user}"
    );
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/flexbridge"]"#));
    assert!(dockerfile.contains(r#"CMD ["run""#));

    let out = tempfile::tempdir().unwrap();
    let status = Command::new(root().join("deploy/image/build.sh"))
        .arg(out.path())
        .env("FLEXBRIDGE_IMAGE_BINARY", binary())
        .status()
        .unwrap();
    assert!(status.success(), "build.sh failed: {status}");
    let packaged = out.path().join("usr/local/bin/flexbridge");
    assert!(packaged.exists());
    // Stripped: smaller than the binary it came from.
    let before = std::fs::metadata(binary()).unwrap().len();
    let after = std::fs::metadata(&packaged).unwrap().len();
    assert!(after < before, "not stripped: {after} >= {before}");

    // With the image's environment, the packaged binary listens on every interface, as the
    // chart's probes and Service expect.
    let env = dockerfile_env(&dockerfile);
    assert!(!env.is_empty(), "no ENV in the runtime stage");
    let output = Command::new(&packaged)
        .arg("check-config")
        .env_clear()
        .envs(env)
        .env("TWILIO_AUTH_TOKEN", "image-test-token")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("listen = \"0.0.0.0:8080\""), "{printed}");
    assert!(printed.contains("listen = \"0.0.0.0:9090\""), "{printed}");
    assert!(!printed.contains("image-test-token"), "{printed}");
}

/// The script refuses a binary that links a library the runtime image does not have.
#[test]
fn the_build_steps_refuse_a_binary_the_runtime_image_cannot_run() {
    // Python links libpython or libz / libexpat beyond glibc on Debian; any such binary works.
    let candidate = ["/usr/bin/python3", "/usr/bin/curl", "/usr/bin/git"]
        .into_iter()
        .map(Path::new)
        .find(|p| {
            p.exists()
                && Command::new("ldd")
                    .arg(p)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("libz"))
                    .unwrap_or(false)
        })
        .expect("a system binary linking libz (curl or git)");
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(root().join("deploy/image/build.sh"))
        .arg(out.path())
        .env("FLEXBRIDGE_IMAGE_BINARY", candidate)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("libraries the runtime image lacks"),
        "{stderr}"
    );
}
