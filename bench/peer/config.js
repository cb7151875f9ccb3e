'use strict';
// The peer's settings, from the environment pictor-bench starts it with. Every Redis key the
// peer writes starts with PEER_PREFIX (BullMQ's `prefix` option and the job-state hashes), so a
// run is isolated from any other user of the same Redis and can be deleted afterwards.

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

const redisUrl = new URL(process.env.PEER_REDIS_URL || 'redis://127.0.0.1:6379');

module.exports = {
  redis: {
    host: redisUrl.hostname,
    port: Number(redisUrl.port || 6379),
    // BullMQ's workers block on Redis and must retry forever rather than fail a command.
    maxRetriesPerRequest: null,
  },
  prefix: required('PEER_PREFIX'),
  queue: 'jobs',
  apiPort: Number(process.env.PEER_API_PORT || 3000),
  apiKey: required('PEER_API_KEY'),
  metricsPort: Number(process.env.PEER_METRICS_PORT || 9464),
  openaiBase: required('OPENAI_BASE_URL').replace(/\/$/, ''),
  imageDir: required('PEER_IMAGE_DIR'),
  concurrency: Number(process.env.PEER_CONCURRENCY || 64),
  // As long as Pictor keeps a job (`jobs.ttl_secs`).
  jobTtlSeconds: 7 * 24 * 3600,
  logLevel: process.env.LOG_LEVEL || 'info',
  stateKey: (prefix, id) => `${prefix}:state:${id}`,
};
