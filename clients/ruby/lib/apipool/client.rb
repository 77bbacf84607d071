# frozen_string_literal: true

require "digest/sha1"
require "redis"

module Apipool
  # Hands API calls to the pool `pool` and waits for their results; Python:
  # apipool.Client. It talks only to Redis, in the wire format of
  # docs/wire-format.md. Safe to share between threads, and across fork (see
  # Connections): make one per process, e.g. in a constant or an initializer.
  #
  #   client = Apipool::Client.new(redis: ENV.fetch("APIPOOL_REDIS_URL"), pool: "payments")
  #   answer = client.call({ "method" => "GET", "url" => "https://api.example.com/v1/x" },
  #                        timeout: 30, deadline: Time.now + 30)
  class Client
    SCRIPT_SHA = Scripts.constants.to_h do |name|
      [name, Digest::SHA1.hexdigest(Scripts.const_get(name))]
    end.freeze
    # The most envelopes (the newest) and bytes of them a client remembers for #cancel.
    REMEMBER_JOBS = 10_000
    REMEMBER_BYTES = 16 * 1024 * 1024

    attr_reader :pool, :max_envelope_bytes

    # redis: a URL, a Hash of Redis.new options, or a Redis object (shared:
    #   see Connections). timeout: the socket timeout in seconds, added by the
    #   redis gem to a blocking wait. max_envelope_bytes: the pool's
    #   --max-envelope-bytes, when it is not the default 1 MiB.
    #   remember_jobs / remember_bytes: bound the envelopes kept for #cancel
    #   (0 jobs: none; cancel then always looks for the id in the queue).
    def initialize(redis:, pool:, max_envelope_bytes: MAX_ENVELOPE_BYTES, timeout: 5.0,
                   remember_jobs: REMEMBER_JOBS, remember_bytes: REMEMBER_BYTES)
      unless pool.is_a?(String) && POOL_NAME.match?(pool)
        raise ConfigError, "invalid pool name #{pool.inspect}: 1 to 63 lowercase letters, " \
                           "digits or '-', starting and ending with a letter or digit"
      end

      @pool = pool
      @max_envelope_bytes = max_envelope_bytes
      @connections = Connections.new(redis, timeout)
      @sent = Sent.new(remember_jobs, remember_bytes)
      @unread_refused = false
    end

    def inspect
      "#<#{self.class} pool=#{@pool}>"
    end

    def close
      @connections.close
    end

    # The name of the pool's key `name` (docs/wire-format.md, "Keys of a pool").
    def key(name)
      "apipool:{#{@pool}}:#{name}"
    end

    # -- submitting ------------------------------------------------------------

    # Queues one job; returns its id. deadline: a unix time (or a Time) after
    # which the call is not worth making (the job is then answered expired,
    # uncalled). id: your own job id (also the API's Idempotency-Key), default
    # a random one. Raises EnvelopeError or QueueFull with nothing queued.
    def submit(payload, id: nil, deadline: nil, handler: nil, meta: nil)
      id ||= Envelope.new_id
      push([[id, encode(payload, id: id, deadline: deadline, handler: handler, meta: meta)]])
      id
    end

    # Queues many jobs in one round trip, all or none; returns their ids in
    # order. At most MAX_SUBMIT_BATCH payloads: a larger batch raises
    # ConfigError before anything is queued (split it).
    def submit_many(payloads, deadline: nil, handler: nil, meta: nil)
      batch = payloads.first(MAX_SUBMIT_BATCH + 1)
      if batch.size > MAX_SUBMIT_BATCH
        raise ConfigError, "submit_many takes at most #{MAX_SUBMIT_BATCH} payloads in one batch " \
                           "(one Redis command); split the batch into several calls"
      end

      encoded = batch.map do |payload|
        id = Envelope.new_id
        [id, encode(payload, id: id, deadline: deadline, handler: handler, meta: meta)]
      end
      push(encoded) unless encoded.empty?
      encoded.map(&:first)
    end

    # -- results ---------------------------------------------------------------

    # Blocks until the job's result record exists and returns it as a Result;
    # the record stays for any other reader (a blocking rotation of its
    # one-element list). ResultTimeout after `timeout` seconds (0: look once,
    # without blocking); JobFailed when the record is malformed. Reading it
    # takes the job off the pool's unread set (not counted expired_unread).
    def wait(id, timeout)
      k = key("result:#{id}")
      deadline = monotonic + timeout
      loop do
        left = deadline - monotonic
        raw = redis("waiting for job #{id}") { |r| look(r, k, left) }
        return read(id, raw) if raw
        raise ResultTimeout.new(id, timeout) if deadline - monotonic <= 0
      end
    end

    # The handler's return value; raises ResultTimeout, JobFailed or JobExpired.
    def result(id, timeout = 30)
      wait(id, timeout).value
    end

    # Submits and waits: the handler's return value, or a typed error.
    def call(payload, timeout: 30, **submit_options)
      result(submit(payload, **submit_options), timeout)
    end

    # -- calls nobody waits for ------------------------------------------------

    # Removes job `id` from the queue before a slot takes it: true when removed
    # (no slot will call it, no result record is written: a waiter elsewhere
    # times out), false when it is not in the queue (a slot took it, it is
    # done, or it is unknown); atomic (the CANCEL script). A job this client
    # submitted (one of its newest remember_jobs) is found by its exact
    # envelope wherever it is in the queue; any other among the `scan`
    # envelopes nearest the end slots take from.
    def cancel(id, scan: CANCEL_SCAN)
      return false unless id.is_a?(String) && JOB_ID.match?(id)

      argv = [id, @sent.get(id), [scan, 0].max]
      code = redis("cancelling job #{id}") { |r| script(r, :CANCEL, [key("queue"), key("stats")], argv) }
      @sent.forget(id)
      code == 1
    end

    # -- settings producers read -----------------------------------------------

    def max_queue_length
      value = redis("reading the config of pool #{@pool}") { |r| r.hget(key("config"), "max_queue_length") }
      Integer(value || 0)
    end

    private

    def encode(payload, **fields)
      Envelope.encode(payload, max_bytes: @max_envelope_bytes, **fields)
    end

    # Pushes [id, envelope] pairs through the SUBMIT script, all or none.
    def push(encoded)
      keys = [key("queue"), key("config"), key("stats")]
      n = redis("submitting to pool #{@pool}") { |r| script(r, :SUBMIT, keys, encoded.map(&:last)) }
      raise QueueFull.new(@pool, -1 - n, max_queue_length) if n.negative?

      encoded.each { |id, raw| @sent.add(id, raw) }
      n
    end

    # The record read: the job leaves the unread set (ZREM; a Redis that
    # refuses it, e.g. an ACL without ZREM, is told once and not fatal).
    def read(id, raw)
      @sent.forget(id)
      begin
        redis("marking job #{id} read") { |r| r.zrem(key("unread"), id) }
      rescue RedisUnavailable => e
        unless @unread_refused
          @unread_refused = true
          warn "apipool: pool #{@pool}: results read here are counted as expired unread: #{e.message}"
        end
      end
      Result.from_json(raw, id)
    end

    # The record at `k`: a blocking rotation for up to `left` seconds (at least
    # 10 ms: 0 would block forever), or with no time left one look (LRANGE,
    # which the producer's ACL in docs/operations.md allows; LINDEX it does not).
    def look(conn, k, left)
      return conn.lrange(k, -1, -1)[0] unless left.positive?

      conn.blmove(k, k, "RIGHT", "RIGHT", timeout: [left, 0.01].max)
    end

    # EVALSHA, and EVAL when the server does not know the script yet.
    def script(conn, name, keys, argv)
      conn.evalsha(SCRIPT_SHA.fetch(name), keys: keys, argv: argv)
    rescue Redis::CommandError => e
      raise unless e.message.start_with?("NOSCRIPT")

      conn.eval(Scripts.const_get(name), keys: keys, argv: argv)
    end

    # Runs the block with a connection; errors of Redis become RedisUnavailable.
    def redis(what, &block)
      @connections.with(&block)
    rescue Redis::BaseError => e
      raise RedisUnavailable, "#{what} failed: #{e.class}: #{e.message}"
    end

    def monotonic
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
