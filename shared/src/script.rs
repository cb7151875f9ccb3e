//! A Lua script's keys and arguments as a value ([`Part`]), so that one step can run as a
//! script of its own or as one part of a script that runs several steps in one call (and one
//! round trip).
//!
//! A composed script defines each step as a Lua function of `(KEYS, ARGV)` with the step's own
//! script as its body (`lua_function!`), then cuts its KEYS and ARGV into each part's with
//! `split_parts!`: `PARTS[i][1]` and `PARTS[i][2]` are what part `i` would have been given
//! alone. [`Part::compose`] lays the parts out that way.

use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

/// The keys and arguments of one script call.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Part {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Part {
    pub fn key(&mut self, key: impl Into<String>) -> &mut Self {
        self.keys.push(key.into());
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.args.is_empty()
    }

    /// Runs `script` with this part's keys and arguments (`EVALSHA`, loading the script
    /// first if Redis does not have it, as [`redis::ScriptInvocation`] does). The command is
    /// packed straight from the part: no copy of each argument on the way, which a job's
    /// scripts (a hundred arguments and more) would pay on every call.
    pub async fn invoke_async<T: FromRedisValue>(
        &self,
        script: &Script,
        connection: &mut impl redis::aio::ConnectionLike,
    ) -> RedisResult<T> {
        let bytes = self.keys.iter().map(String::len).sum::<usize>()
            + self.args.iter().map(Vec::len).sum::<usize>()
            + 64;
        let mut command = Cmd::with_capacity(3 + self.keys.len() + self.args.len(), bytes);
        command
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        match command.query_async(connection).await {
            Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(connection).await?;
                command.query_async(connection).await
            }
            answered => answered,
        }
    }

    /// The parts in turn as the keys and arguments of one composed script: its ARGV starts
    /// with the number of parts and each part's key and argument counts. The parts are moved
    /// in, not copied.
    pub fn compose<const N: usize>(parts: [Part; N]) -> Part {
        let mut composed = Part::default();
        composed.arg(N);
        for part in &parts {
            composed.arg(part.keys.len()).arg(part.args.len());
        }
        for part in parts {
            composed.keys.extend(part.keys);
            composed.args.extend(part.args);
        }
        composed
    }
}

/// `local function NAME(KEYS, ARGV) BODY end`: a script's text as a step of a composed one.
/// Its `return`s answer the function, and its `KEYS` and `ARGV` are the part's own.
macro_rules! lua_function {
    ($name:literal, $body:expr) => {
        concat!("local function ", $name, "(KEYS, ARGV)\n", $body, "\nend\n")
    };
}
pub(crate) use lua_function;

/// Lua that cuts a composed script's KEYS and ARGV into `PARTS` (see [`Part::compose`]).
macro_rules! split_parts {
    () => {
        "
local PARTS = {}
do
  -- `{unpack(...)}` builds a slice in one C call, sized once: a loop of `t[i] = ...` costs a
  -- gate about 5 µs more. Lua's stack bounds `unpack` (8,000 values), so a longer slice
  -- (no step passes one) takes the loop.
  local function slice(from, count, list)
    if count == 0 then return {} end
    if count <= 4000 then return {unpack(list, from, from + count - 1)} end
    local out = {}
    for i = 1, count do out[i] = list[from + i - 1] end
    return out
  end
  local count = tonumber(ARGV[1])
  local next_key, next_arg = 1, 2 + 2 * count
  for p = 1, count do
    local key_count, arg_count = tonumber(ARGV[2 * p]), tonumber(ARGV[2 * p + 1])
    PARTS[p] = {slice(next_key, key_count, KEYS), slice(next_arg, arg_count, ARGV)}
    next_key, next_arg = next_key + key_count, next_arg + arg_count
  end
end
"
    };
}
pub(crate) use split_parts;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each part of a composed script sees the keys and arguments it would have seen alone.
    #[tokio::test]
    async fn a_composed_script_gives_each_part_its_own_keys_and_arguments() {
        const ECHO: &str = "return {KEYS, ARGV}";
        let script = Script::new(concat!(
            lua_function!("echo", "return {KEYS, ARGV}"),
            split_parts!(),
            "return {echo(PARTS[1][1], PARTS[1][2]), echo(PARTS[2][1], PARTS[2][2]), \
             echo(PARTS[3][1], PARTS[3][2])}"
        ));
        let mut first = Part::default();
        first.key("k1").key("k2").arg("a").arg(2_u64);
        let empty = Part::default();
        let mut third = Part::default();
        third.key("k3").arg("").arg("b c").arg(-7_i64);
        type Echo = (Vec<String>, Vec<String>);
        // Nothing is written: the script only echoes what it was given.
        let mut connection = crate::test_redis::connect().await;
        let composed: Vec<Echo> = Part::compose([first.clone(), empty.clone(), third.clone()])
            .invoke_async(&script, &mut connection)
            .await
            .unwrap();
        let mut alone = Vec::new();
        for part in [&first, &empty, &third] {
            let echoed: Echo = part
                .invoke_async(&Script::new(ECHO), &mut connection)
                .await
                .unwrap();
            alone.push(echoed);
        }
        assert_eq!(composed, alone);
        assert_eq!(
            composed[2],
            (
                vec!["k3".to_string()],
                vec![String::new(), "b c".to_string(), "-7".to_string()]
            )
        );
    }

    /// A part longer than one `unpack` may give (Lua's 8,000 values) arrives whole, and so
    /// do the parts around it.
    #[tokio::test]
    async fn a_part_longer_than_unpack_allows_arrives_whole() {
        let script = Script::new(concat!(
            split_parts!(),
            "return {#PARTS[1][2], PARTS[1][2][1], PARTS[1][2][#PARTS[1][2]], \
             PARTS[2][1][1], PARTS[2][2][1]}"
        ));
        let mut long = Part::default();
        for index in 0..9_000_u32 {
            long.arg(index);
        }
        let mut after = Part::default();
        after.key("k").arg("last");
        let mut connection = crate::test_redis::connect().await;
        let reply: (u32, String, String, String, String) = Part::compose([long, after])
            .invoke_async(&script, &mut connection)
            .await
            .unwrap();
        assert_eq!(
            reply,
            (
                9_000,
                "0".to_string(),
                "8999".to_string(),
                "k".to_string(),
                "last".to_string()
            )
        );
    }

    /// A script Redis has never seen (`NOSCRIPT` to its `EVALSHA`) is loaded and run.
    #[tokio::test]
    async fn a_script_redis_does_not_have_is_loaded_and_run() {
        // A text no other run has sent, so Redis cannot have it yet.
        let text = format!("-- {}\nreturn ARGV[1] .. KEYS[1]", uuid::Uuid::new_v4());
        let script = Script::new(&text);
        let mut connection = crate::test_redis::connect().await;
        let mut part = Part::default();
        part.key("k").arg("v");
        let answer: String = part.invoke_async(&script, &mut connection).await.unwrap();
        assert_eq!(answer, "vk");
        let loaded: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(script.get_hash())
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(loaded, vec![true]);
    }
}
