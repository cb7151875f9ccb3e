'use strict';
// The peer's worker: a BullMQ Worker at concurrency PEER_CONCURRENCY running each job as
// Pictor's create pipeline does: the router's chat completion (structured output) says what the
// job is, the image model draws it (`b64_json`), the PNG is decoded and written to the image
// directory, and the job's final state goes into a Redis hash. Provider calls go through one
// keep-alive undici agent, as a Node team would call an HTTP API.
//
// It also serves `GET /metrics` (the jobs it finished, by outcome, in Prometheus' text format)
// and `GET /healthz`, so pictor-bench counts its jobs the way it counts Pictor's.

const fs = require('node:fs/promises');
const http = require('node:http');
const path = require('node:path');
const IORedis = require('ioredis');
const pino = require('pino');
const { Worker, UnrecoverableError } = require('bullmq');
const { Agent, request } = require('undici');
const config = require('./config');

const log = pino({ level: config.logLevel });
const agent = new Agent({ keepAliveTimeout: 30_000, connections: 256 });
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const ROUTER_INSTRUCTIONS =
  'You route requests for an image service. Choose the intent: "create": draw a new image ' +
  'from the text; "edit": change the attached image; "unclear": the request cannot be acted on ' +
  'without a question. Put a cleaned-up prompt in "prompt" and, when unclear, one short ' +
  'question in "question".';

const INTENT_SCHEMA = {
  type: 'object',
  additionalProperties: false,
  required: ['intent', 'confidence', 'prompt', 'question'],
  properties: {
    intent: { type: 'string', enum: ['create', 'edit', 'unclear'] },
    confidence: { type: 'number' },
    prompt: { type: 'string' },
    question: { type: ['string', 'null'] },
  },
};

/** POSTs `body` as JSON to the provider and answers the parsed reply; 429 and 5xx retry. */
async function callProvider(route, body) {
  const response = await request(`${config.openaiBase}/${route}`, {
    method: 'POST',
    dispatcher: agent,
    headers: {
      authorization: `Bearer ${process.env.OPENAI_API_KEY || ''}`,
      'content-type': 'application/json',
    },
    body: JSON.stringify(body),
  });
  if (response.statusCode !== 200) {
    const text = await response.body.text();
    const message = `${route} answered ${response.statusCode}: ${text.slice(0, 200)}`;
    if (response.statusCode === 429 || response.statusCode >= 500) {
      throw new Error(message);
    }
    throw new UnrecoverableError(message);
  }
  return response.body.json();
}

async function classify(prompt) {
  const completion = await callProvider('chat/completions', {
    model: 'gpt-4.1-mini',
    messages: [
      { role: 'system', content: ROUTER_INSTRUCTIONS },
      { role: 'user', content: `No image is attached to this request.\n\nRequest:\n${prompt}` },
    ],
    response_format: {
      type: 'json_schema',
      json_schema: { name: 'intent', strict: true, schema: INTENT_SCHEMA },
    },
  });
  const content = completion.choices?.[0]?.message?.content;
  if (typeof content !== 'string') {
    throw new UnrecoverableError('the router answered no content');
  }
  const verdict = JSON.parse(content);
  return { verdict, usage: completion.usage || {} };
}

async function generate(job, prompt) {
  const answer = await callProvider('images/generations', {
    model: 'gpt-image-2',
    prompt,
    n: job.data.n,
    size: job.data.size,
    quality: 'medium',
    output_format: 'png',
  });
  const images = (answer.data || []).map((item) => Buffer.from(item.b64_json || '', 'base64'));
  if (images.length === 0 || images.some((png) => !png.subarray(0, 8).equals(PNG_SIGNATURE))) {
    throw new UnrecoverableError('the image model answered no PNG');
  }
  const files = [];
  for (const [index, png] of images.entries()) {
    const file = path.join(config.imageDir, images.length === 1 ? `${job.id}.png` : `${job.id}-${index}.png`);
    await fs.writeFile(file, png);
    files.push(file);
  }
  return { files, usage: answer.usage || {} };
}

async function run(job, redis) {
  const { verdict, usage: routerUsage } = await classify(job.data.prompt);
  const key = config.stateKey(config.prefix, job.id);
  if (verdict.intent !== 'create') {
    await redis.pipeline()
      .hset(key, { status: 'needs_clarification', intent: verdict.intent, question: verdict.question || '' })
      .expire(key, config.jobTtlSeconds)
      .exec();
    return 'needs_clarification';
  }
  const prompt = verdict.prompt.trim() || job.data.prompt;
  const { files, usage } = await generate(job, prompt);
  const results = await redis.pipeline()
    .hset(key, {
      status: 'succeeded',
      intent: verdict.intent,
      prompt,
      images: files.join(','),
      router_tokens: routerUsage.total_tokens || 0,
      image_tokens: usage.total_tokens || 0,
      finished_at: new Date().toISOString(),
    })
    .expire(key, config.jobTtlSeconds)
    .exec();
  for (const [error] of results) {
    if (error) {
      throw error;
    }
  }
  return 'succeeded';
}

async function main() {
  await fs.mkdir(config.imageDir, { recursive: true });
  const redis = new IORedis(config.redis);
  const finished = { succeeded: 0, needs_clarification: 0, failed: 0 };
  const worker = new Worker(config.queue, (job) => run(job, redis), {
    connection: config.redis,
    prefix: config.prefix,
    concurrency: config.concurrency,
  });
  worker.on('completed', (job, outcome) => {
    finished[outcome] += 1;
    log.info({ jobId: job.id, outcome }, 'job finished');
  });
  worker.on('failed', (job, error) => {
    // A job that will be retried is not finished yet.
    if (job && job.attemptsMade >= (job.opts.attempts || 1)) {
      finished.failed += 1;
    }
    log.warn({ jobId: job && job.id, err: error }, 'job attempt failed');
  });
  worker.on('error', (error) => log.error({ err: error }, 'worker error'));

  let ready = false;
  const server = http.createServer((req, res) => {
    if (req.url === '/metrics') {
      const lines = ['# TYPE peer_jobs_finished_total counter'];
      for (const [outcome, count] of Object.entries(finished)) {
        lines.push(`peer_jobs_finished_total{outcome="${outcome}"} ${count}`);
      }
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
      res.end(`${lines.join('\n')}\n`);
    } else if (req.url === '/healthz') {
      res.writeHead(ready ? 200 : 503);
      res.end();
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  server.listen(config.metricsPort, '127.0.0.1');
  await worker.waitUntilReady();
  ready = true;
  log.info({ concurrency: config.concurrency, queue: config.queue }, 'worker consuming jobs');

  let stopping = false;
  const stop = async () => {
    if (stopping) {
      return;
    }
    stopping = true;
    await worker.close();
    await redis.quit();
    server.close();
    await agent.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((error) => {
  log.error({ err: error }, 'worker cannot start');
  process.exit(1);
});
