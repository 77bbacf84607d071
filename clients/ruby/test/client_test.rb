# frozen_string_literal: true

require_relative "test_helper"

# Apipool::Client against a real pool (APIPOOL_POOL: slots with the handlers
# echo, fail and sleep of tests/handlers.py).
class ClientTest < Minitest::Test
  include PoolHelpers

  def pool
    ENV.fetch("APIPOOL_POOL")
  end

  def client
    @client ||= Apipool::Client.new(redis: client_url, pool: pool)
  end

  def test_submit_and_wait_read_the_record_without_consuming_it
    submitted = raw.hget(key(pool, "stats"), "submitted").to_i
    id = client.submit({ "n" => 1, "text" => "é" })
    assert_match(/\A\h{32}\z/, id)
    record = client.wait(id, 15)
    assert_instance_of Apipool::Result, record
    assert_equal [id, "ok", 1], [record.id, record.status, record.attempt]
    assert record.ok?
    assert_equal({ "n" => 1, "text" => "é" }, record.result["echo"])
    assert_equal id, record.result["job"]
    assert_includes [0, 1], record.slot
    assert_operator record.finished_at, :>=, record.started_at
    # still there for any other reader, and for a second wait
    assert_equal 1, raw.llen(key(pool, "result:#{id}"))
    assert_equal record.to_h, client.wait(id, 1).to_h
    assert_equal record.to_h, client.wait(id, 0).to_h # a look without blocking
    assert_equal submitted + 1, raw.hget(key(pool, "stats"), "submitted").to_i
  end

  def test_call_returns_the_value_with_the_callers_id_and_meta
    id = "rb-call-#{SecureRandom.hex(4)}"
    answer = client.call([1, nil, 2.5], timeout: 15, id: id, meta: { "trace" => "t-1" },
                                        deadline: Time.now + 30)
    assert_equal({ "echo" => [1, nil, 2.5], "job" => id, "attempt" => 1 }, answer.except("slot"))
    assert_equal [1, nil, 2.5], client.result(id, 1)["echo"]
  end

  def test_submit_many_queues_a_batch_and_every_job_is_answered
    ids = client.submit_many((1..25).map { |i| { "i" => i } })
    assert_equal 25, ids.uniq.size
    values = ids.map { |id| client.result(id, 20) }
    assert_equal (1..25).to_a, values.map { |v| v["echo"]["i"] }
    assert_equal ids, values.map { |v| v["job"] }
    assert_equal [], client.submit_many([])
  end

  def test_a_dead_lettered_job_raises_job_failed_with_the_reason
    id = client.submit({ "url" => "https://api.example/v1/orders?key=secret" }, handler: "fail")
    error = assert_raises(Apipool::JobFailed) { client.result(id, 15) }
    refute_kind_of Apipool::JobExpired, error
    assert_equal id, error.job_id
    assert_equal 1, error.attempt
    assert error.reason.start_with?("attempt 1 of 3 failed for good:"), error.reason
    assert_includes error.reason, "bad input"
    assert_equal "job #{id} failed: #{error.reason}", error.message
    dead = raw.lrange(key(pool, "dead"), 0, -1).map { |d| JSON.parse(d) }.find { |d| d["id"] == id }
    assert_equal error.reason, dead["reason"]
    assert_equal "dead", client.wait(id, 1).status
  end

  def test_a_job_past_its_deadline_raises_job_expired_uncalled
    id = client.submit({ "late" => true }, deadline: Time.now.to_f - 1)
    error = assert_raises(Apipool::JobExpired) { client.result(id, 15) }
    assert_kind_of Apipool::JobFailed, error
    assert_equal "deadline passed before the call could start", error.reason
    record = client.wait(id, 1)
    assert_equal ["expired", nil], [record.status, record.result]
  end

  def test_no_result_in_time_raises_result_timeout
    id = "rb-never-#{SecureRandom.hex(4)}"
    started = monotonic
    error = assert_raises(Apipool::ResultTimeout) { client.wait(id, 0.4) }
    assert_operator monotonic - started, :>=, 0.4
    assert_operator monotonic - started, :<, 3
    assert_equal [id, 0.4], [error.job_id, error.timeout]
    assert_equal "no result for job #{id} within 0.4 s", error.message
    assert_raises(Apipool::ResultTimeout) { client.result(id, 0) }
  end

  # A reader takes the job off the pool's unread set, so the result is not
  # counted expired_unread; what nobody read stays there.
  def test_reading_a_result_marks_it_read
    id = "rb-unread-#{SecureRandom.hex(4)}"
    other = "rb-unread-#{SecureRandom.hex(4)}"
    record = JSON.generate("id" => id, "status" => "ok", "result" => 1, "error" => nil,
                           "attempt" => 1, "slot" => 0, "started_at" => 1.0, "finished_at" => 2.0)
    raw.lpush(key(pool, "result:#{id}"), record)
    raw.zadd(key(pool, "unread"), [[9e12, id], [9e12, other]])
    assert_equal 1, client.result(id, 1)
    assert_nil raw.zscore(key(pool, "unread"), id)
    refute_nil raw.zscore(key(pool, "unread"), other)
    raw.zrem(key(pool, "unread"), other)
    done = client.submit("read me")
    client.wait(done, 15)
    assert_nil raw.zscore(key(pool, "unread"), done)
    refute client.cancel(done) # done: nothing left to cancel
  end

  def test_a_malformed_record_raises_job_failed
    id = "rb-bad-#{SecureRandom.hex(4)}"
    raw.lpush(key(pool, "result:#{id}"), "{not json")
    error = assert_raises(Apipool::JobFailed) { client.wait(id, 1) }
    assert error.reason.start_with?("malformed result record: not JSON"), error.reason
    raw.del(key(pool, "result:#{id}"))
    raw.lpush(key(pool, "result:#{id}"), "[1]")
    error = assert_raises(Apipool::JobFailed) { client.wait(id, 1) }
    assert_equal "malformed result record: a JSON Array, not an object", error.reason
  end

  # Each thread waits on its own connection: a long wait holds up nobody.
  def test_threads_wait_side_by_side
    blocked = Thread.new do
      client.wait("rb-never-#{SecureRandom.hex(4)}", 5)
    rescue Apipool::ResultTimeout => e
      e
    end
    sleep 0.2 until blocked.status == "sleep" || !blocked.alive?
    started = monotonic
    assert_equal({ "t" => 1 }, client.call({ "t" => 1 }, timeout: 10)["echo"])
    assert_operator monotonic - started, :<, 4
    assert blocked.alive?, "the long wait ended before the call did"
    assert_instance_of Apipool::ResultTimeout, blocked.value
  end

  # A client made before fork works in the child and still in the parent. A
  # Redis object of redis-rb 4.x refuses its parent's connection in a child
  # (Redis::InheritedError; with its default reconnect_attempts: 1 it closes
  # that socket and reconnects instead); the client opens new connections.
  def test_a_client_made_before_fork_works_in_the_child
    shared = Redis.new(url: client_url, timeout: 5, reconnect_attempts: 0)
    clients = [client, Apipool::Client.new(redis: shared, pool: pool)]
    clients.each { |c| assert_equal "before", c.call("before", timeout: 15)["echo"] }
    reader, writer = IO.pipe
    child = fork do
      reader.close
      inherited = begin
        shared.llen(key(pool, "queue"))
        "used"
      rescue Redis::InheritedError
        "refused"
      end
      answers = clients.map { |c| c.call("in child #{Process.pid}", timeout: 15)["echo"] }
      writer.write(JSON.generate("inherited" => inherited, "answers" => answers, "pid" => Process.pid))
      writer.close
      exit!(0)
    rescue StandardError => e
      writer.write(JSON.generate("error" => "#{e.class}: #{e.message}"))
      exit!(1)
    end
    writer.close
    report = JSON.parse(reader.read)
    _, status = Process.wait2(child)
    assert status.success?, report.inspect
    expected = Gem::Version.new(Redis::VERSION) < Gem::Version.new("5") ? "refused" : "used"
    assert_equal expected, report["inherited"]
    assert_equal ["in child #{report["pid"]}"] * 2, report["answers"]
    clients.each { |c| assert_equal "after", c.call("after", timeout: 15)["echo"] }
    assert_kind_of Integer, shared.llen(key(pool, "queue")) # the parent's connection still works
  end
end
