//! A what-if re-run's prompt and outcome as the `experiments` topic carries them. Pure: the
//! CLI's single re-run and inference's batch lane fill an `ExperimentRun` the same way.

use parley_events::{ExperimentMessage, ExperimentRun};

use crate::completion::{Completion, LlmError, millis};
use crate::prompt::ChatMessage;
use crate::proof::{role_name, role_named};

/// `messages` as an `ExperimentRequested` carries them.
pub fn to_experiment_messages(messages: &[ChatMessage]) -> Vec<ExperimentMessage> {
    messages
        .iter()
        .map(|m| ExperimentMessage { role: role_name(m.role).to_owned(), content: m.content.clone() })
        .collect()
}

/// The prompt an `ExperimentRequested` carries; Err names a role no chat API knows.
pub fn from_experiment_messages(messages: &[ExperimentMessage]) -> Result<Vec<ChatMessage>, String> {
    messages
        .iter()
        .map(|m| {
            let role =
                role_named(&m.role).ok_or_else(|| format!("{:?} is not a role (system, user, assistant)", m.role))?;
            Ok(ChatMessage { role, content: m.content.clone() })
        })
        .collect()
}

/// Writes the model call's outcome into `run`: the answer, its usage and latency and the
/// server that gave it, or the failure's kind and message (then no text).
pub fn record_outcome(run: &mut ExperimentRun, result: Result<Completion, LlmError>) {
    match result {
        Ok(completion) => {
            run.text = completion.text;
            run.finish_reason = completion.finish_reason;
            run.prompt_tokens = completion.prompt_tokens;
            run.completion_tokens = completion.completion_tokens;
            run.llm_latency_ms = millis(completion.latency);
            run.time_to_first_token_ms = completion.time_to_first_token.map(millis);
            run.endpoint = completion.endpoint;
        }
        Err(error) => run.error = format!("{}: {error}", error.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::Role;

    #[test]
    fn messages_cross_the_event_and_back_and_a_strange_role_is_refused() {
        let messages = vec![
            ChatMessage { role: Role::System, content: "Be brief.".into() },
            ChatMessage { role: Role::User, content: "Name a planet.".into() },
            ChatMessage { role: Role::Assistant, content: "Mars.".into() },
        ];
        let carried = to_experiment_messages(&messages);
        assert_eq!(carried[2].role, "assistant");
        assert_eq!(from_experiment_messages(&carried).unwrap(), messages);
        let strange = [ExperimentMessage { role: "tool".into(), content: String::new() }];
        assert!(from_experiment_messages(&strange).unwrap_err().contains("\"tool\""));
    }
}
