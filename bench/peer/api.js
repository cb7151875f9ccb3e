'use strict';
// The peer's api: `POST /v1/jobs` validates a small JSON job, adds it to a BullMQ queue and
// answers 202 with its id; `GET /v1/jobs/:id` answers the job's final state (the hash the worker
// writes) or, before that, where BullMQ has it. The same contract as Pictor's api for the jobs
// pictor-bench posts, written the way a Fastify team would write it.

const crypto = require('node:crypto');
const Fastify = require('fastify');
const IORedis = require('ioredis');
const { Queue } = require('bullmq');
const config = require('./config');

const SIZES = ['1024x1024', '1536x1024', '1024x1536', 'auto'];

const createJob = {
  body: {
    type: 'object',
    required: ['prompt'],
    additionalProperties: false,
    properties: {
      prompt: { type: 'string', minLength: 1, maxLength: 32000 },
      size: { type: 'string', enum: SIZES, default: '1024x1024' },
      n: { type: 'integer', minimum: 1, maximum: 4, default: 1 },
    },
  },
  response: {
    202: {
      type: 'object',
      properties: { id: { type: 'string' }, status: { type: 'string' } },
    },
  },
};

const getJob = {
  params: {
    type: 'object',
    properties: { id: { type: 'string', format: 'uuid' } },
  },
};

function main() {
  // One line per accepted job at info, as Pictor's api logs "Job accepted"; Fastify's own two
  // lines per request would be debug-level chatter in Pictor's terms.
  const app = Fastify({
    logger: { level: config.logLevel },
    disableRequestLogging: true,
    bodyLimit: 64 * 1024,
  });
  const queue = new Queue(config.queue, {
    connection: config.redis,
    prefix: config.prefix,
    defaultJobOptions: {
      attempts: 3,
      backoff: { type: 'exponential', delay: 1000 },
      // The job's outcome lives in its own state hash; BullMQ's copy would be a second one.
      removeOnComplete: true,
      removeOnFail: 1000,
    },
  });
  const redis = new IORedis(config.redis);
  const expected = Buffer.from(`Bearer ${config.apiKey}`);

  app.addHook('onRequest', async (request, reply) => {
    if (!request.url.startsWith('/v1/')) {
      return;
    }
    const given = Buffer.from(request.headers.authorization || '');
    if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
      return reply.code(401).send({ error: { code: 'unauthorized', message: 'a valid API key is required' } });
    }
  });

  app.post('/v1/jobs', { schema: createJob }, async (request, reply) => {
    const id = crypto.randomUUID();
    const { prompt, size, n } = request.body;
    await queue.add('create', { prompt, size, n }, { jobId: id });
    request.log.info({ jobId: id }, 'job accepted');
    reply.code(202).header('location', `/v1/jobs/${id}`);
    return { id, status: 'queued' };
  });

  app.get('/v1/jobs/:id', { schema: getJob }, async (request, reply) => {
    const { id } = request.params;
    const state = await redis.hgetall(config.stateKey(config.prefix, id));
    if (state.status) {
      return { id, ...state };
    }
    const job = await queue.getJob(id);
    if (!job) {
      reply.code(404);
      return { error: { code: 'not_found', message: 'no such job' } };
    }
    const where = await job.getState();
    return { id, status: where === 'active' ? 'running' : where === 'failed' ? 'failed' : 'queued' };
  });

  app.get('/readyz', async () => {
    await redis.ping();
    return { ready: true };
  });

  let stopping = false;
  const stop = async () => {
    if (stopping) {
      return;
    }
    stopping = true;
    await app.close();
    await queue.close();
    await redis.quit();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);

  app.listen({ host: '127.0.0.1', port: config.apiPort }).catch((error) => {
    app.log.error(error, 'cannot listen');
    process.exit(1);
  });
}

main();
