//! How binaries end: an error as one line, and free loopback ports for the services they start.

use std::process::ExitCode;

/// An error and its causes, outermost first, as the one line every binary prints:
/// `error: reading x.nii.gz: No such file or directory`.
pub fn error_line(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    format!("error: {}", chain.join(": "))
}

/// A command's result as its exit code: success, or the [`error_line`] on stderr and `code`.
pub fn exit_with(result: anyhow::Result<()>, code: u8) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::from(code)
        }
    }
}

/// A loopback TCP port that was free a moment ago (the OS picks it). Another process may take
/// it before the caller binds it; callers that start servers on it retry or fail clearly.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_error_line_holds_every_cause_outermost_first() {
        let e = Err::<(), _>(std::io::Error::other("disk full")).context("writing out.nii.gz").unwrap_err();
        assert_eq!(error_line(&e), "error: writing out.nii.gz: disk full");
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
