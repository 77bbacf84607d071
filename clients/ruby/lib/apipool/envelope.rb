# frozen_string_literal: true

require "json"
require "securerandom"

module Apipool
  # Limits of the wire format (docs/wire-format.md, "Limits and bad input"),
  # the same figures as operator/apipool/defaults.py (a test compares them).
  MAX_ENVELOPE_BYTES = 1 << 20
  MAX_JSON_DEPTH = 64
  MAX_SUBMIT_BATCH = 10_000
  POOL_NAME = /\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\z/.freeze
  JOB_ID = /\A[A-Za-z0-9._:-]{1,128}\z/.freeze

  # The job envelope of a first attempt, checked before anything is pushed:
  # whatever a slot would dead-letter unread as malformed raises EnvelopeError
  # here instead (a value that is not JSON, NaN or Infinity, an integer beyond
  # a double, nesting deeper than MAX_JSON_DEPTH, a cycle, invalid UTF-8, an
  # envelope over the size limit).
  module Envelope
    MAX_INTEGER = Float::MAX.to_i

    module_function

    def new_id
      SecureRandom.uuid.delete("-")
    end

    # The envelope as the compact JSON to push.
    def encode(payload, id: nil, deadline: nil, handler: nil, meta: nil,
               max_bytes: MAX_ENVELOPE_BYTES, now: Time.now.to_f)
      doc = { "id" => check_id(id || new_id), "payload" => payload, "submitted_at" => now,
              "attempt" => 1 }
      doc["deadline"] = check_deadline(deadline) unless deadline.nil?
      doc["handler"] = check_handler(handler) unless handler.nil?
      doc["meta"] = check_meta(meta) unless meta.nil?
      check_json(doc, 0, "envelope")
      generate(doc, max_bytes)
    end

    def generate(doc, max_bytes)
      json = JSON.generate(doc)
      if json.bytesize > max_bytes
        raise EnvelopeError, "envelope of #{json.bytesize} bytes is over the limit of #{max_bytes} bytes"
      end

      json
    rescue JSON::GeneratorError, Encoding::UndefinedConversionError,
           Encoding::InvalidByteSequenceError => e
      raise EnvelopeError, "payload is not JSON: #{e.message}"
    end

    def check_id(id)
      return id if id.is_a?(String) && JOB_ID.match?(id)

      raise EnvelopeError, "field 'id' must be 1-128 characters of A-Z a-z 0-9 . _ : -"
    end

    def check_deadline(deadline)
      value = deadline.is_a?(Time) ? deadline.to_f : deadline
      return value if value.is_a?(Numeric) && value.real? && value.to_f.finite? && value >= 0

      raise EnvelopeError, "field 'deadline' must be a unix time in seconds (or a Time) or nil"
    end

    def check_handler(handler)
      return handler if handler.is_a?(String) && !handler.empty?

      raise EnvelopeError, "field 'handler' must be a non-empty string or nil"
    end

    def check_meta(meta)
      return meta if meta.is_a?(Hash)

      raise EnvelopeError, "field 'meta' must be a Hash or nil"
    end

    # Walks a value as JSON would see it; `depth` is how many objects and
    # arrays enclose it. Bounded by MAX_JSON_DEPTH, so a cycle is refused too.
    def check_json(value, depth, path)
      case value
      when nil, true, false, String, Symbol then nil
      when Integer
        raise EnvelopeError, "#{path} is an integer beyond a double" if value.abs > MAX_INTEGER
      when Float
        raise EnvelopeError, "#{path} is #{value}, which is not JSON" unless value.finite?
      when Array, Hash then check_container(value, depth + 1, path)
      else
        raise EnvelopeError, "#{path} is a #{value.class}, not a JSON value"
      end
    end

    def check_container(value, depth, path)
      if depth > MAX_JSON_DEPTH
        raise EnvelopeError, "envelope nests objects and arrays deeper than #{MAX_JSON_DEPTH} " \
                             "(or holds a cycle) at #{path}"
      end
      if value.is_a?(Array)
        value.each_with_index { |item, i| check_json(item, depth, "#{path}[#{i}]") }
        return
      end
      value.each do |key, item|
        unless key.is_a?(String) || key.is_a?(Symbol)
          raise EnvelopeError, "#{path} has a #{key.class} key; JSON keys are strings"
        end

        check_json(item, depth, "#{path}.#{key}")
      end
      raise EnvelopeError, "#{path} names a key twice" if value.keys.map(&:to_s).uniq.size != value.size
    end
  end
end
