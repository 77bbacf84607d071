# frozen_string_literal: true

require_relative "test_helper"

# Apipool::Client against a pool that no slot serves: what it queues, what it
# refuses before queueing anything, backpressure, and cancel.
class QueueTest < Minitest::Test
  include PoolHelpers

  def client
    @client ||= Apipool::Client.new(redis: redis_url, pool: idle_pool)
  end

  def queued
    raw.lrange(key(idle_pool, "queue"), 0, -1).reverse.map { |e| JSON.parse(e) }
  end

  def test_the_envelope_is_a_first_attempt_in_the_documented_shape
    before = Time.now.to_f
    deadline = Time.now + 60
    id = client.submit({ "url" => "https://api.example.com/v1/x" },
                       deadline: deadline, handler: "http", meta: { "job" => "Charge" })
    assert_equal 1, queued.size
    env = queued.first
    assert_equal %w[attempt deadline handler id meta payload submitted_at], env.keys.sort
    assert_equal [id, 1, "http", { "job" => "Charge" }], env.values_at("id", "attempt", "handler", "meta")
    assert_equal({ "url" => "https://api.example.com/v1/x" }, env["payload"])
    assert_in_delta deadline.to_f, env["deadline"], 0.001
    assert_operator env["submitted_at"], :>=, before
    assert_equal 1, raw.hget(key(idle_pool, "stats"), "submitted").to_i
    # the smallest envelope: a nil payload, no optional field
    client.submit(nil, id: "ping-1")
    assert_equal({ "id" => "ping-1", "payload" => nil, "attempt" => 1 }, queued.last.except("submitted_at"))
  end

  def test_a_full_queue_raises_queue_full_and_queues_nothing
    raw.hset(key(idle_pool, "config"), "max_queue_length", 3)
    assert_equal 2, client.submit_many(%w[a b]).size
    error = assert_raises(Apipool::QueueFull) { client.submit_many(%w[c d]) }
    assert_equal [idle_pool, 2, 3], [error.pool, error.depth, error.limit]
    assert_equal "queue of pool #{idle_pool.inspect} is full (2 queued, limit 3)", error.message
    assert_equal %w[a b], queued.map { |e| e["payload"] }
    client.submit("c")
    error = assert_raises(Apipool::QueueFull) { client.submit("d") }
    assert_equal 3, error.depth
    assert_equal %w[a b c], queued.map { |e| e["payload"] }
    assert_equal 3, raw.hget(key(idle_pool, "stats"), "submitted").to_i
    assert_equal 3, client.max_queue_length
  end

  def test_submit_many_takes_at_most_the_batch_limit
    assert_equal 10_000, Apipool::MAX_SUBMIT_BATCH
    error = assert_raises(Apipool::ConfigError) { client.submit_many(Array.new(10_001, 1)) }
    assert_match(/at most 10000 payloads/, error.message)
    assert_equal 0, raw.llen(key(idle_pool, "queue"))
    # a lazy source is read no further than the limit and one more
    assert_raises(Apipool::ConfigError) { client.submit_many((1..Float::INFINITY).lazy.map { |i| i }) }
    ids = client.submit_many(Array.new(10_000) { |i| i }) # pushed 1000 at a time, in one script
    assert_equal 10_000, raw.llen(key(idle_pool, "queue"))
    assert_equal [ids.first, 0], queued.first.values_at("id", "payload")
    assert_equal [ids.last, 9_999], queued.last.values_at("id", "payload")
  end

  def test_a_payload_that_is_not_json_raises_before_anything_is_queued
    cyclic = []
    cyclic << cyclic
    deep = 63.times.reduce("leaf") { |inner, _| [inner] } # 64 levels with the envelope
    bad = {
      "NaN" => Float::NAN, "Infinity" => [-Float::INFINITY], "object" => { "at" => Object.new },
      "time" => Time.now, "invalid UTF-8" => "\xff\xfe", "integer beyond a double" => 10**400,
      "too deep" => [deep], "cycle" => cyclic, "integer key" => { 1 => "one" },
      "key twice" => { "a" => 1, a: 2 }, "too big" => "x" * Apipool::MAX_ENVELOPE_BYTES
    }
    bad.each do |what, payload|
      assert_raises(Apipool::EnvelopeError, what) { client.submit(payload) }
      assert_raises(Apipool::EnvelopeError, what) { client.submit_many(["fine", payload]) }
    end
    assert_raises(Apipool::EnvelopeError) { client.submit("x", id: "no spaces") }
    assert_raises(Apipool::EnvelopeError) { client.submit("x", id: "x" * 129) }
    assert_raises(Apipool::EnvelopeError) { client.submit("x", deadline: Float::NAN) }
    assert_raises(Apipool::EnvelopeError) { client.submit("x", handler: "") }
    assert_raises(Apipool::EnvelopeError) { client.submit("x", meta: [1]) }
    assert_equal 0, raw.llen(key(idle_pool, "queue"))
    assert_nil raw.hget(key(idle_pool, "stats"), "submitted")
    # what is at the limits is accepted
    client.submit(deep)
    client.submit({ a: 10**300, "b" => -1.5e300, c: :sym })
    assert_equal 2, raw.llen(key(idle_pool, "queue"))
    big = Apipool::Client.new(redis: redis_url, pool: idle_pool, max_envelope_bytes: 100)
    assert_raises(Apipool::EnvelopeError) { big.submit("x" * 100) }
  ensure
    big&.close
  end

  def test_cancel_removes_a_queued_job_and_only_that_one
    a, b, c = client.submit_many(%w[a b c])
    assert client.cancel(b)
    assert_equal %w[a c], queued.map { |e| e["payload"] }
    refute client.cancel(b) # gone already
    refute client.cancel("rb-unknown-1")
    refute client.cancel("not an id!")
    # a client that did not submit it finds it by its id, near the end slots take from
    other = Apipool::Client.new(redis: redis_url, pool: idle_pool, remember_jobs: 0)
    assert other.cancel(a)
    assert_equal [c], queued.map { |e| e["id"] }
    assert_equal 2, raw.hget(key(idle_pool, "stats"), "cancelled").to_i
  ensure
    other&.close
  end

  def test_cancel_finds_its_own_job_beyond_the_scan
    client.submit_many(Array.new(1_500) { |i| i })
    other = Apipool::Client.new(redis: redis_url, pool: idle_pool)
    late = other.submit("late") # 1500 jobs ahead of it
    forgetful = Apipool::Client.new(redis: redis_url, pool: idle_pool, remember_jobs: 0)
    refute forgetful.cancel(late) # not among the 1000 next in line
    assert forgetful.cancel(late, scan: 2_000)
    late = other.submit("late again")
    assert other.cancel(late) # by its exact envelope, however long the queue
    assert_equal 1_500, raw.llen(key(idle_pool, "queue"))
    refute_includes queued.map { |e| e["payload"] }, "late again"
  ensure
    [other, forgetful].each { |c| c&.close }
  end

  def test_bad_settings_and_an_unreachable_redis_raise_typed_errors
    ["", "Upper", "-x", "x" * 64, "a_b", nil].each do |name|
      assert_raises(Apipool::ConfigError, name.inspect) { Apipool::Client.new(redis: redis_url, pool: name) }
    end
    assert_raises(Apipool::ConfigError) { Apipool::Client.new(redis: 42, pool: "p") }
    port = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] } # closed again: nobody listens
    gone = Apipool::Client.new(redis: "redis://127.0.0.1:#{port}/0", pool: "p", timeout: 0.5)
    error = assert_raises(Apipool::RedisUnavailable) { gone.submit("x") }
    assert_kind_of Redis::BaseConnectionError, error.cause
    assert_raises(Apipool::RedisUnavailable) { gone.wait("x", 0.1) }
    assert_raises(Apipool::RedisUnavailable) { gone.cancel("x") }
    refute gone.cancel("not an id!") # never asks Redis
    gone.close
    assert_raises(Apipool::ConfigError) { gone.submit("x") }
  end
end
