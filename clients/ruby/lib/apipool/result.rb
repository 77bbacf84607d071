# frozen_string_literal: true

require "json"

module Apipool
  # A finished job as its result record describes it (docs/wire-format.md,
  # "The result record"); Python: apipool.client.JobResult.
  class Result
    FIELDS = %i[id status result error attempt slot started_at finished_at].freeze
    # Deeper results (a handler may return any JSON) raise JobFailed, not a stack overflow.
    MAX_RESULT_NESTING = 512
    attr_reader(*FIELDS)

    def initialize(id:, status:, result: nil, error: nil, attempt: 0, slot: -1,
                   started_at: nil, finished_at: nil)
      @id = id
      @status = status
      @result = result
      @error = error
      @attempt = attempt
      @slot = slot
      @started_at = started_at
      @finished_at = finished_at
      freeze
    end

    # Reads a result record; JobFailed ("malformed result record: ...") when it
    # is not JSON, not an object, or lacks a string id or status. Other fields
    # of the wrong type read as absent.
    def self.from_json(raw, job_id = nil)
      doc = parse(raw, job_id)
      unless doc["id"].is_a?(String) && doc["status"].is_a?(String)
        raise JobFailed.new(job_id || "?",
                            "malformed result record: fields 'id' and 'status' must be strings")
      end

      error = doc["error"]
      new(id: doc["id"], status: doc["status"], result: doc["result"],
          error: error.nil? ? nil : error.to_s,
          attempt: whole(doc["attempt"], 0), slot: whole(doc["slot"], -1),
          started_at: time(doc["started_at"]), finished_at: time(doc["finished_at"]))
    end

    def self.parse(raw, job_id)
      doc = JSON.parse(raw, max_nesting: MAX_RESULT_NESTING)
      return doc if doc.is_a?(Hash)

      raise JobFailed.new(job_id || "?",
                          "malformed result record: a JSON #{doc.class}, not an object")
    rescue JSON::ParserError, EncodingError => e
      raise JobFailed.new(job_id || "?", "malformed result record: not JSON: #{e.message}")
    end

    def self.whole(value, default)
      return value if value.is_a?(Integer)
      return value.to_i if value.is_a?(Float) && value.finite? && value == value.floor

      default
    end

    def self.time(value)
      value.is_a?(Numeric) && value.to_f.finite? ? value.to_f : nil
    end
    private_class_method :parse, :whole, :time

    def ok?
      status == "ok"
    end

    # The handler's return value; raises JobExpired or JobFailed otherwise.
    def value
      case status
      when "ok" then result
      when "expired" then raise JobExpired.new(id, error || "deadline passed", attempt)
      when "dead" then raise JobFailed.new(id, error || "dead-lettered", attempt)
      else raise JobFailed.new(id, "unknown result status #{status.inspect}", attempt)
      end
    end

    def to_h
      FIELDS.to_h { |name| [name, public_send(name)] }
    end
  end
end
