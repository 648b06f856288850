//! The verification request: `GET ?hub.mode=subscribe&hub.challenge=C&hub.verify_token=T`.
//! The challenge is echoed byte for byte (after URL decoding), never parsed as a number.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Longest challenge echoed. Meta sends a decimal integer; anything this long is not Meta.
pub const MAX_CHALLENGE_BYTES: usize = 1024;

/// Why a verification request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeError {
    MissingMode,
    WrongMode,
    MissingChallenge,
    ChallengeTooLong,
    MissingToken,
    /// One of the three parameters appears more than once.
    DuplicateParameter,
    /// Well-formed, but the token is not the route's `verify_token` (answered 403).
    WrongToken,
}

impl ChallengeError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingMode => "missing_mode",
            Self::WrongMode => "wrong_mode",
            Self::MissingChallenge => "missing_challenge",
            Self::ChallengeTooLong => "challenge_too_long",
            Self::MissingToken => "missing_token",
            Self::DuplicateParameter => "duplicate_parameter",
            Self::WrongToken => "wrong_token",
        }
    }
}

/// Returns the challenge to echo, or why not.
pub fn answer(query: Option<&str>, verify_token: &Secret) -> Result<String, ChallengeError> {
    let (mut mode, mut challenge, mut token) = (None, None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match &*k {
            "hub.mode" => &mut mode,
            "hub.challenge" => &mut challenge,
            "hub.verify_token" => &mut token,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(ChallengeError::DuplicateParameter);
        }
    }
    match mode.as_deref() {
        None | Some("") => return Err(ChallengeError::MissingMode),
        Some("subscribe") => {}
        Some(_) => return Err(ChallengeError::WrongMode),
    }
    let challenge = challenge
        .filter(|c| !c.is_empty())
        .ok_or(ChallengeError::MissingChallenge)?;
    if challenge.len() > MAX_CHALLENGE_BYTES {
        return Err(ChallengeError::ChallengeTooLong);
    }
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or(ChallengeError::MissingToken)?;
    // Compare digests so that neither the content nor the length of the token leaks through time.
    let given = Sha256::digest(token.as_bytes());
    let expected = Sha256::digest(verify_token.expose());
    if bool::from(given.ct_eq(&expected)) {
        Ok(challenge.into_owned())
    } else {
        Err(ChallengeError::WrongToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Secret {
        Secret::new("tok en")
    }

    #[test]
    fn echoes_decoded_challenge() {
        let q = "hub.mode=subscribe&hub.challenge=abc%2F%3Cx%3E&hub.verify_token=tok+en";
        assert_eq!(answer(Some(q), &t()).unwrap(), "abc/<x>");
    }

    #[test]
    fn refusals() {
        let cases = [
            (None, ChallengeError::MissingMode),
            (
                Some("hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=x"),
                ChallengeError::WrongMode,
            ),
            (
                Some("hub.mode=subscribe&hub.verify_token=x"),
                ChallengeError::MissingChallenge,
            ),
            (
                Some("hub.mode=subscribe&hub.challenge=1"),
                ChallengeError::MissingToken,
            ),
            (
                Some("hub.mode=subscribe&hub.challenge=1&hub.challenge=2&hub.verify_token=x"),
                ChallengeError::DuplicateParameter,
            ),
            (
                Some("hub.mode=subscribe&hub.challenge=1&hub.verify_token=tok"),
                ChallengeError::WrongToken,
            ),
        ];
        for (q, want) in cases {
            assert_eq!(answer(q, &t()), Err(want), "{q:?}");
        }
        let long = format!(
            "hub.mode=subscribe&hub.challenge={}&hub.verify_token=tok+en",
            "1".repeat(MAX_CHALLENGE_BYTES + 1)
        );
        assert_eq!(
            answer(Some(&long), &t()),
            Err(ChallengeError::ChallengeTooLong)
        );
    }
}
