# frozen_string_literal: true

require "redis"

module Apipool
  # The Redis connections of one Client, safe across threads and across fork.
  #
  # Given a URL (or a Hash of Redis.new options), it opens one connection per
  # thread that is using the client at that moment, and keeps them for reuse:
  # a thread blocked waiting for a result never holds up another thread.
  # Given a Redis object, it shares that one object (redis-rb runs one command
  # at a time on it, so a waiting thread holds it for the others).
  #
  # Fork: redis-rb 4.x refuses a connection inherited from the parent
  # (Redis::InheritedError) and redis-rb 5.x reconnects by itself. Either way,
  # the first use in a child process (Process.pid changed) leaves the parent's
  # connections alone (not closed: the socket is the parent's too) and opens
  # new ones; with a Redis object of redis-rb 4.x, a new Redis with the same
  # options replaces it in the child.
  class Connections
    REDIS_4 = Gem::Version.new(Redis::VERSION) < Gem::Version.new("5")

    def initialize(redis, timeout)
      case redis
      when String then @options = { url: redis, timeout: timeout }
      when Hash then @options = { timeout: timeout }.merge(redis)
      when Redis then @shared = redis
      else raise ConfigError, "redis: must be a URL, a Hash of Redis.new options or a Redis, " \
                              "not a #{redis.class}"
      end
      @lock = Mutex.new
      @idle = []
      @pid = Process.pid
      @closed = false
    end

    # Yields a connection for the block's commands.
    def with
      conn = checkout
      yield conn
    ensure
      checkin(conn) if conn
    end

    # Closes the connections this client opened; a Redis object it was given
    # stays open (it is the caller's). The client is not usable afterwards.
    def close
      idle = @lock.synchronize do
        @closed = true
        @idle.slice!(0..)
      end
      idle.each(&:close) if @pid == Process.pid
    end

    private

    def checkout
      after_fork unless @pid == Process.pid
      raise ConfigError, "the client is closed" if @closed
      return @shared if @shared

      @lock.synchronize { @idle.pop } || Redis.new(@options)
    end

    def checkin(conn)
      return if conn.equal?(@shared)

      keep = @lock.synchronize do
        @idle.push(conn) if !@closed && @pid == Process.pid
      end
      conn.close unless keep
    end

    def after_fork
      @lock = Mutex.new # one the parent's threads may have held at fork time
      @idle = []        # the parent's sockets: left open for the parent
      @pid = Process.pid
      @shared = Redis.new(@shared._client.options.dup) if @shared && REDIS_4
    end
  end
end
