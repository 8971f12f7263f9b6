//! What the remotecommand protocols put on the error stream, and their
//! resize messages.

use crate::linux::exec::ExecExit;
use serde_json::json;

/// The error-stream message for how the command ended. v4 and later always
/// send a metav1.Status (Success included); older versions only send a text
/// on failure.
pub fn of_exit(version: u8, exit: &Result<ExecExit, String>, cmd: &[String]) -> Option<String> {
    match (exit, version >= 4) {
        (Ok(e), true) if e.exit_code == 0 => {
            Some(json!({"metadata": {}, "status": "Success"}).to_string())
        }
        (Ok(e), true) => Some(
            json!({
                "metadata": {},
                "status": "Failure",
                "message": format!(
                    "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {}",
                    e.exit_code
                ),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": e.exit_code.to_string()}]},
            })
            .to_string(),
        ),
        (Err(msg), true) => Some(
            json!({"metadata": {}, "status": "Failure", "message": msg, "reason": "InternalError"})
                .to_string(),
        ),
        (Ok(e), false) if e.exit_code == 0 => None,
        (Ok(e), false) => Some(format!(
            "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {}",
            e.exit_code
        )),
        (Err(msg), false) => Some(msg.clone()),
    }
}

/// A TerminalSize JSON (`{"Width":80,"Height":24}`).
pub fn parse_resize(data: &[u8]) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let s: Size = serde_json::from_slice(data).ok()?;
    Some((s.width, s.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let ok = Ok(ExecExit {
            exit_code: 0,
            message: None,
        });
        let three = Ok(ExecExit {
            exit_code: 3,
            message: None,
        });
        let cmd = vec!["sh".to_string()];
        let v: serde_json::Value = serde_json::from_str(&of_exit(4, &ok, &cmd).unwrap()).unwrap();
        assert_eq!(v["status"], "Success");
        let v: serde_json::Value =
            serde_json::from_str(&of_exit(5, &three, &cmd).unwrap()).unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert_eq!(of_exit(2, &ok, &cmd), None);
        assert!(of_exit(2, &three, &cmd).unwrap().contains("exit code 3"));
    }

    #[test]
    fn resize() {
        assert_eq!(
            parse_resize(br#"{"Width":100,"Height":40}"#),
            Some((100, 40))
        );
        assert_eq!(parse_resize(b"{}"), None);
    }
}
