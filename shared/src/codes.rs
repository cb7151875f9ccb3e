//! The stable codes a job carries to its users: why it failed ([`FailureCode`], the job's
//! `error.code`) and what happened to it on the way ([`NoticeKind`], a notice's `code`).
//!
//! Clients branch on these strings, so each enum's wire name (`as_str`) never changes once
//! shipped; `ALL` lists every variant, which is how `docs/error-handling.md` is checked to
//! explain each one. The job record keeps the code as the string it was written with, so a
//! record written by a newer release with a code this one does not know still reads.

use strum::{IntoStaticStr, VariantArray};

/// Why a job ended `failed` (or why a provider call failed), as a stable machine code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum FailureCode {
    /// The provider could not be reached, or answered with a server error.
    ProviderUnavailable,
    /// The provider did not answer in time.
    ProviderTimeout,
    /// The provider's rate limit held past the retry budget.
    RateLimited,
    /// The provider account's quota or spend limit is used up.
    QuotaExceeded,
    /// The provider's safety system declined the request.
    ContentBlocked,
    /// The model declined to answer.
    Refused,
    /// The provider rejected the API key.
    ProviderAuthFailed,
    /// The provider (or an agent, before calling it) could not accept the request.
    InvalidRequest,
    /// The provider answered without an image.
    NoImageReturned,
    /// The provider's answer could not be read.
    BadResponse,
    /// A blocking monthly budget has no room for the call.
    BudgetExhausted,
    /// The agent needs an input image and the job has none.
    ImageRequired,
    /// An upscale of an image that is already as large as the model makes.
    ImageAtMaxSize,
    /// The job could not be processed after several deliveries or requeues.
    ProcessingFailed,
    /// A bug: details are in the logs, never in the job.
    InternalError,
}

impl FailureCode {
    /// Every code, for documentation checks and exhaustive tests.
    pub const ALL: &'static [Self] = Self::VARIANTS;

    /// The wire name, e.g. `provider_unavailable`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The sentence a user reads when nothing more specific is said: what happened, and whether
    /// trying again later may help. Technical detail never goes here.
    pub fn user_message(self) -> &'static str {
        match self {
            Self::RateLimited => {
                "The image service is busy right now. Please try again in a minute."
            }
            Self::ProviderTimeout => {
                "The image service took too long to answer. Please try again in a few minutes."
            }
            Self::QuotaExceeded => {
                "The image service has reached its usage limit. Please try again later or \
                 contact support."
            }
            Self::ContentBlocked => {
                "The request was declined by the provider's safety system. Please rephrase your \
                 prompt."
            }
            Self::Refused => {
                "The request was declined by the provider. Please rephrase your prompt."
            }
            Self::ProviderAuthFailed => {
                "The image service is not configured correctly. Please contact support."
            }
            Self::InvalidRequest => {
                "The image service could not accept this request. Please check your prompt and \
                 image and try again."
            }
            Self::NoImageReturned => {
                "The image service answered without producing an image. Please try describing \
                 your request differently."
            }
            Self::BadResponse => {
                "The image service returned an unexpected answer. Please try again in a few \
                 minutes."
            }
            Self::ProviderUnavailable => {
                "The image service is temporarily unavailable. Please try again in a few minutes."
            }
            Self::BudgetExhausted => {
                "This month's budget for image generation is used up. Please try again next \
                 month or contact the administrator."
            }
            Self::ImageRequired => "This request needs an image: attach one and try again.",
            Self::ImageAtMaxSize => "Your image is already as large as we can make it.",
            Self::ProcessingFailed => {
                "We could not process this job after several tries. Please submit it again."
            }
            Self::InternalError => "Something went wrong on our side. Please try again.",
        }
    }

    /// Whether another provider might succeed where this one failed: true for outages,
    /// timeouts, exhausted limits and configuration trouble; false for anything about the
    /// request itself (a safety block, an invalid request, a model that made no image) and for
    /// Pictor's own decisions.
    pub fn is_provider_failure(self) -> bool {
        matches!(
            self,
            Self::ProviderUnavailable
                | Self::ProviderTimeout
                | Self::RateLimited
                | Self::QuotaExceeded
                | Self::ProviderAuthFailed
                | Self::BadResponse
        )
    }
}

impl std::fmt::Display for FailureCode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// What a notice on a job says happened (its `code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum NoticeKind {
    /// A provider call failed and is tried again after a delay.
    Retrying,
    /// A rate limit or the budget in use sent the job back in line until `retry_at`.
    RateLimited,
    /// The usual provider failed or is cooling down; another one served the call.
    FallbackProvider,
    /// The watchdog put a job that stopped making progress back in line.
    Requeued,
    /// The user canceled the job.
    Canceled,
    /// The user answered the clarification question; the job runs again.
    Clarified,
    /// Support replayed the job from the dead-letter queue.
    Replayed,
}

impl NoticeKind {
    /// Every kind, for documentation checks.
    pub const ALL: &'static [Self] = Self::VARIANTS;

    /// The wire name, e.g. `fallback_provider`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for NoticeKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_the_snake_case_codes_clients_already_read() {
        assert_eq!(
            FailureCode::ProviderUnavailable.as_str(),
            "provider_unavailable"
        );
        assert_eq!(FailureCode::ImageAtMaxSize.as_str(), "image_at_max_size");
        assert_eq!(
            FailureCode::ProviderAuthFailed.to_string(),
            "provider_auth_failed"
        );
        assert_eq!(NoticeKind::FallbackProvider.as_str(), "fallback_provider");
        assert_eq!(NoticeKind::RateLimited.as_str(), "rate_limited");
    }

    #[test]
    fn every_code_has_its_own_wire_name_and_a_sentence() {
        let names: std::collections::HashSet<_> =
            FailureCode::ALL.iter().map(|code| code.as_str()).collect();
        assert_eq!(names.len(), FailureCode::ALL.len());
        for code in FailureCode::ALL {
            assert!(code.user_message().ends_with('.'), "{code}");
        }
        let kinds: std::collections::HashSet<_> =
            NoticeKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(kinds.len(), NoticeKind::ALL.len());
    }

    #[test]
    fn only_trouble_with_the_provider_is_worth_another_provider() {
        assert!(FailureCode::ProviderTimeout.is_provider_failure());
        assert!(FailureCode::QuotaExceeded.is_provider_failure());
        assert!(!FailureCode::ContentBlocked.is_provider_failure());
        assert!(!FailureCode::ImageRequired.is_provider_failure());
        assert!(!FailureCode::BudgetExhausted.is_provider_failure());
    }
}
