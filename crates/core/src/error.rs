//! Error classes shared by every jetsource error type.

/// Tells a caller what to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Someone else changed the aggregate first: reload and decide again.
    Conflict,
    /// The store was unreachable or slow: retrying the same thing later may work.
    Transient,
    /// Retrying the same request can never work: fix the input or the setup.
    Permanent,
}

/// An error and its causes on one line, `outer: cause: root`, each cause
/// said once. Many messages already quote their source (`cannot read
/// x.toml: No such file`); printing the chain as well would repeat it, so
/// a cause whose text the line already holds is left out.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to 127.0.0.1:1: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("start-up failed")]
    struct Outer(#[source] Quoting);

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let line = error_chain(&Outer(Quoting(io)));
        assert_eq!(
            line,
            "start-up failed: cannot connect to 127.0.0.1:1: Connection refused"
        );
    }
}
