#!/usr/bin/env ruby
# frozen_string_literal: true

# A resque-style apipool producer that needs nothing but the `redis` gem (4.x or
# 5.x) and the standard library. It follows docs/wire-format.md:
#
#   * a job envelope is {id, payload, submitted_at, attempt: 1, [deadline]};
#   * it is submitted with a plain LPUSH onto apipool:{POOL}:queue, or through
#     the SUBMIT script (EVAL) to respect the pool's max_queue_length;
#   * its result is read without consuming it, by a blocking rotation of the
#     one-element list apipool:{POOL}:result:<id> (BLMOVE ... RIGHT RIGHT, or
#     BRPOPLPUSH on Redis < 6.2 / an older gem).
#
# Use it as a library (`require_relative "producer"`, then ApiPool.submit /
# ApiPool.result; see README.md) or as a command:
#
#   ruby producer.rb --redis-url URL --pool NAME --count N --url API_URL \
#        [--deadline-in S] [--timeout S] [--bounded] [--payload JSON]
#
# It prints one JSON line per job and exits 0 when every job got an `ok` result,
# 1 otherwise (2 for bad arguments, or a payload the pool would refuse unread).

require "json"
require "securerandom"
require "redis"

module ApiPool
  # The submit script from docs/wire-format.md, verbatim (also
  # operator/apipool/layout.py SUBMIT_SCRIPT; tests compare them).
  SUBMIT_SCRIPT = <<~LUA
    local limit = tonumber(redis.call('HGET', KEYS[2], 'max_queue_length') or '0') or 0
    local depth = redis.call('LLEN', KEYS[1])
    if limit > 0 and depth + #ARGV > limit then
      return -1 - depth
    end
    local n = depth
    for i = 1, #ARGV, 1000 do
      n = redis.call('LPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
    redis.call('HINCRBY', KEYS[3], 'submitted', #ARGV)
    return n
  LUA

  POOL_NAME = /\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\z/.freeze
  JOB_ID = /\A[A-Za-z0-9._:-]{1,128}\z/.freeze
  # The pool's default max_envelope_bytes and its nesting limit (docs/wire-format.md,
  # "Limits and bad input"): a slot dead-letters a bigger or deeper envelope unread.
  MAX_ENVELOPE_BYTES = 1 << 20
  MAX_JSON_DEPTH = 64

  Error = Class.new(StandardError)
  # Raised before anything is pushed when an envelope would be dead-lettered
  # unread: over the size limit, nested too deep, or not JSON (NaN, Infinity).
  EnvelopeError = Class.new(Error)
  # Raised by a bounded submit when the queue is full; nothing was queued.
  class QueueFull < Error
    attr_reader :depth

    def initialize(pool, depth)
      @depth = depth
      super("pool #{pool}: queue full (#{depth} jobs queued)")
    end
  end

  class << self
    attr_writer :redis, :pool

    # The Redis connection used when none is passed: $APIPOOL_REDIS_URL.
    def redis
      @redis ||= Redis.new(url: ENV.fetch("APIPOOL_REDIS_URL", "redis://127.0.0.1:6379/0"))
    end

    # The pool used when none is passed: $APIPOOL_POOL.
    def pool
      @pool ||= ENV.fetch("APIPOOL_POOL") { raise Error, "no pool given and APIPOOL_POOL unset" }
    end

    def key(pool, name)
      raise ArgumentError, "invalid pool name #{pool.inspect}" unless POOL_NAME.match?(pool)

      "apipool:{#{pool}}:#{name}"
    end

    # The envelope of a first attempt, as a Hash.
    def envelope(payload, id: SecureRandom.uuid, deadline_in: nil, handler: nil, meta: nil,
                 now: Time.now.to_f)
      raise ArgumentError, "invalid job id #{id.inspect}" unless JOB_ID.match?(id)

      env = { "id" => id, "payload" => payload, "submitted_at" => now, "attempt" => 1 }
      env["deadline"] = now + Float(deadline_in) if deadline_in
      env["handler"] = handler if handler
      env["meta"] = meta if meta
      env
    end

    # The envelope as the JSON to push; EnvelopeError when a slot would refuse it
    # unread (over max_bytes, nested deeper than MAX_JSON_DEPTH, NaN or Infinity).
    def encode(env, max_bytes: MAX_ENVELOPE_BYTES)
      json = JSON.generate(env, max_nesting: MAX_JSON_DEPTH)
      if json.bytesize > max_bytes
        raise EnvelopeError, "envelope of #{json.bytesize} bytes is over the limit of #{max_bytes} bytes"
      end

      json
    rescue JSON::NestingError, JSON::GeneratorError => e
      raise EnvelopeError, "envelope is not JSON a pool accepts: #{e.message}"
    end

    # Queue one job; returns its id. bounded: true runs the SUBMIT script and
    # raises QueueFull (nothing queued) when the pool's max_queue_length is
    # reached; the default is a plain LPUSH (no bound, not counted in stats).
    # Raises EnvelopeError (nothing queued) for an envelope over max_bytes (pass
    # the pool's --max-envelope-bytes if it is not the default).
    def submit(payload, id: SecureRandom.uuid, deadline_in: nil, handler: nil, meta: nil,
               bounded: false, max_bytes: MAX_ENVELOPE_BYTES, redis: self.redis, pool: self.pool)
      env = envelope(payload, id: id, deadline_in: deadline_in, handler: handler, meta: meta)
      push(redis, pool, [encode(env, max_bytes: max_bytes)], bounded: bounded)
      id
    end

    # Push serialized envelopes; returns the queue length after the push. Keep a
    # batch to a few thousand: one push is one Redis command.
    def push(redis, pool, envelopes, bounded: false)
      queue = key(pool, "queue")
      return redis.lpush(queue, envelopes) unless bounded

      keys = [queue, key(pool, "config"), key(pool, "stats")]
      n = redis.eval(SUBMIT_SCRIPT, keys: keys, argv: envelopes)
      raise QueueFull.new(pool, -1 - n) if n.negative?

      n
    end

    # The result record of job `id` as a Hash, or nil when it has not appeared
    # within `timeout` seconds (0: non-blocking check). Never consumes it.
    def result(id, timeout: 30, redis: self.redis, pool: self.pool)
      k = key(pool, "result:#{id}")
      raw = timeout.to_f <= 0 ? redis.lindex(k, -1) : rotate(redis, k, timeout.to_f)
      raw && JSON.parse(raw)
    end

    # Submit and wait: the result record, or nil after `timeout` seconds.
    def call(payload, timeout: 30, **opts)
      id = submit(payload, **opts)
      result(id, timeout: timeout,
                 **opts.slice(:redis, :pool))
    end

    private

    # BLMOVE k k RIGHT RIGHT timeout (Redis >= 6.2, gem >= 4.8), else
    # BRPOPLPUSH k k timeout. Both pop the right end and push it back there.
    def rotate(redis, k, timeout)
      if redis.respond_to?(:blmove) && !@no_blmove
        begin
          return redis.blmove(k, k, "RIGHT", "RIGHT", timeout: timeout)
        rescue Redis::CommandError => e
          raise unless e.message =~ /unknown command|ERR unknown/i

          @no_blmove = true
        end
      end
      # Before Redis 6.0 BRPOPLPUSH takes whole seconds only.
      redis.brpoplpush(k, k, timeout: timeout.ceil)
    end
  end

  # The command line: ruby producer.rb --help
  module CLI
    module_function

    def parse(argv)
      require "optparse"
      opts = { count: 1, timeout: 30.0, deadline_in: nil, bounded: false, payload: nil,
               url: nil, id_prefix: "rb-#{SecureRandom.hex(4)}" }
      parser = OptionParser.new do |o|
        o.banner = "usage: ruby producer.rb --redis-url URL --pool NAME --count N " \
                   "--url API_URL [options]"
        o.on("--redis-url URL", "Redis URL (default $APIPOOL_REDIS_URL)") { |v| opts[:redis_url] = v }
        o.on("--pool NAME", "pool name") { |v| opts[:pool] = v }
        o.on("--count N", Integer, "jobs to submit (default 1)") { |v| opts[:count] = v }
        o.on("--url API_URL", "GET this URL through the pool's http handler") { |v| opts[:url] = v }
        o.on("--payload JSON", "send this payload instead of {\"url\": API_URL}") do |v|
          opts[:payload] = JSON.parse(v)
        end
        o.on("--deadline-in S", Float, "deadline S seconds after submission") { |v| opts[:deadline_in] = v }
        o.on("--timeout S", Float, "wait at most S seconds in all (default 30)") { |v| opts[:timeout] = v }
        o.on("--bounded", "submit through the SUBMIT script (respects max_queue_length)") do
          opts[:bounded] = true
        end
        o.on("--id-prefix P", "job ids are P-1, P-2, ... (default random)") { |v| opts[:id_prefix] = v }
      end
      parser.parse!(argv)
      opts[:redis_url] ||= ENV["APIPOOL_REDIS_URL"]
      missing = %i[redis_url pool].reject { |k| opts[k] }
      missing << :url if opts[:url].nil? && opts[:payload].nil?
      raise OptionParser::MissingArgument, missing.map { |k| "--#{k.to_s.tr('_', '-')}" }.join(", ") \
        unless missing.empty?
      raise OptionParser::InvalidArgument, "--count must be >= 1" if opts[:count] < 1
      raise OptionParser::InvalidArgument, "--timeout must be > 0" unless opts[:timeout].positive?

      opts
    rescue OptionParser::ParseError, JSON::ParserError => e
      warn "producer.rb: #{e.message}"
      warn parser.help if parser
      exit 2
    end

    def emit(line)
      $stdout.puts(JSON.generate(line))
      $stdout.flush
    end

    def summary(id, record, waited)
      return { "id" => id, "status" => "timeout", "error" => "no result after #{waited.round(3)} s" } \
        unless record

      res = record["result"]
      {
        "id" => id,
        "status" => record["status"],
        "attempt" => record["attempt"],
        "slot" => record["slot"],
        "http_status" => res.is_a?(Hash) ? res["status"] : nil,
        "error" => record["error"],
        "waited_s" => waited.round(3)
      }
    end

    # Submit every job, backing off while a bounded queue is full; returns
    # {id => error line} for the jobs that could not be queued in time.
    def submit_all(redis, opts, ids, deadline)
      payload = opts[:payload] || { "method" => "GET", "url" => opts[:url] }
      rejected = {}
      ids.each do |id|
        env = ApiPool.encode(ApiPool.envelope(payload, id: id, deadline_in: opts[:deadline_in]))
        delay = 0.05
        begin
          ApiPool.push(redis, opts[:pool], [env], bounded: opts[:bounded])
        rescue ApiPool::QueueFull => e
          if monotonic + delay < deadline
            sleep(delay)
            delay = [delay * 2, 1.0].min
            retry
          end
          rejected[id] = { "id" => id, "status" => "rejected", "error" => e.message }
        end
      end
      rejected
    end

    def monotonic
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    def run(argv)
      opts = parse(argv)
      redis = Redis.new(url: opts[:redis_url], timeout: 5)
      started = monotonic
      deadline = started + opts[:timeout]
      ids = (1..opts[:count]).map { |i| "#{opts[:id_prefix]}-#{i}" }
      rejected = submit_all(redis, opts, ids, deadline)
      all_ok = rejected.empty?
      ids.each do |id|
        if rejected.key?(id)
          emit(rejected[id])
          next
        end
        remaining = deadline - monotonic
        # A minimum wait of 10 ms keeps the last lookups blocking (0 = forever).
        record = ApiPool.result(id, timeout: [remaining, 0.01].max, redis: redis, pool: opts[:pool])
        line = summary(id, record, monotonic - started)
        all_ok &&= line["status"] == "ok"
        emit(line)
      end
      all_ok ? 0 : 1
    rescue ApiPool::EnvelopeError => e
      warn "producer.rb: #{e.message}"
      2
    rescue Redis::BaseError => e
      warn "producer.rb: redis: #{e.class}: #{e.message}"
      1
    ensure
      redis&.close
    end
  end
end

exit(ApiPool::CLI.run(ARGV)) if $PROGRAM_NAME == __FILE__
